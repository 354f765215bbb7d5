"""Typed backend options: checked when declared, naming the option; the former loose
keywords still work, with a DeprecationWarning."""

from __future__ import annotations

import numpy as np
import pytest

from pydotcompute import (
    CpuOptions,
    CudaOptions,
    InvalidConfigurationError,
    RingKernelConfig,
    RingKernelRuntime,
    ring_kernel,
)

REC = np.dtype([("x", "<f8")])


def handler(msg, out, state):  # type: ignore[no-untyped-def]
    out.x = msg.x * 2.0
    return True


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: CpuOptions(batch=0), "cpu option batch"),
        (lambda: CpuOptions(boundscheck="yes"), "cpu option boundscheck"),  # type: ignore[arg-type]
        (lambda: CudaOptions(threads=-1), "cuda option threads"),
        (lambda: CudaOptions(items_per_thread=True), "cuda option items_per_thread"),  # type: ignore[arg-type]
        (lambda: CudaOptions(cuda_function=3), "cuda option cuda_function"),  # type: ignore[arg-type]
    ],
)
def test_a_bad_option_is_named(make, named) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidConfigurationError, match=named):
        make()


def test_options_are_checked_at_decoration() -> None:
    with pytest.raises(InvalidConfigurationError, match="options must be backend options"):
        ring_kernel(backend="cpu", options={"batch": 4}, auto_register=False)(handler)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigurationError, match="one backend twice"):
        RingKernelConfig(options=(CpuOptions(), CpuOptions(batch=2)))


def test_a_kernel_declared_auto_carries_options_for_both() -> None:
    cfg = RingKernelConfig(backend="auto", options=(CpuOptions(batch=8), CudaOptions(threads=32)))
    assert cfg.options_for(CpuOptions).batch == 8
    assert cfg.options_for(CudaOptions).threads == 32
    assert RingKernelConfig(options=CpuOptions(batch=3)).options_for(CpuOptions).batch == 3
    assert RingKernelConfig().options_for(CudaOptions) == CudaOptions()


def test_the_former_loose_spelling_warns_and_still_applies() -> None:
    with pytest.warns(DeprecationWarning, match="batch as loose keywords are deprecated"):
        fn = ring_kernel(backend="cpu", batch=16, auto_register=False)(handler)
    assert fn.__ring_kernel__.config.options_for(CpuOptions).batch == 16
    with pytest.raises(InvalidConfigurationError, match="cpu option batch"):
        RingKernelConfig(extra={"batch": 0})


def test_other_loose_keywords_are_kept_without_a_warning(recwarn: pytest.WarningsRecorder) -> None:
    fn = ring_kernel(backend="cpu", grid_size=4, auto_register=False)(handler)
    assert fn.__ring_kernel__.config.extra == {"grid_size": 4}
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


async def test_a_cpu_kernel_runs_with_its_options() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "k",
            handler,
            backend="cpu",
            input_type=REC,
            output_type=REC,
            options=CpuOptions(batch=2, boundscheck=True),
        )
        loop = rt._kernels["k"].kernel_backend
        assert (loop.batch, loop.boundscheck) == (2, True)
        await rt.activate("k")
        records = np.zeros(5, REC)
        records["x"] = np.arange(5)
        await rt.send_batch("k", records)
        got: list[float] = []
        while len(got) < 5:
            got.extend((await rt.receive_batch("k", 5, timeout=10))["x"])
        assert sorted(got) == [0.0, 2.0, 4.0, 6.0, 8.0]
