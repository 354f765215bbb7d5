"""The backend registry: built-ins resolve lazily, and a backend from outside the
package registers with one call and runs kernels like any other."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pydotcompute import (
    BackendNotAvailableError,
    InvalidConfigurationError,
    KernelBackend,
    KernelTelemetry,
    RingKernelRuntime,
    backend_names,
    register_backend,
    ring_kernel,
)
from pydotcompute.backends import registry
from pydotcompute.errors import QueueTimeoutError


class InlineBackend(KernelBackend):
    """Runs ``def handler(msg) -> reply`` in one asyncio task between two queues."""

    backend = "inline"
    handler_kind = "function"

    def __init__(self, *args: Any, **links: Any) -> None:
        super().__init__(*args, **links)
        self.inbox: asyncio.Queue[Any] = asyncio.Queue(self.config.queue_size)
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.active = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.processed = 0

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            msg = await self.inbox.get()
            await self.active.wait()
            try:
                reply = self.func(msg)
            except Exception as exc:
                self.failed_input = msg
                self.on_failure(exc)
                return
            self.processed += 1
            await self.outbox.put(reply)

    def set_active(self, active: bool) -> None:
        (self.active.set if active else self.active.clear)()

    def close_failed(self, error: Any) -> int:
        self.failure = error()
        return 0

    async def stop(self, timeout: float) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def put(self, msg: Any, timeout: float | None) -> None:
        await asyncio.wait_for(self.inbox.put(msg), timeout)

    async def get(self, timeout: float | None) -> Any:
        try:
            return await asyncio.wait_for(self.outbox.get(), timeout)
        except TimeoutError:
            raise QueueTimeoutError(f"no output from {self.kernel_id!r}") from None

    def telemetry(self, state: str) -> KernelTelemetry:
        return KernelTelemetry(
            kernel_id=self.kernel_id,
            backend=self.backend,
            state=state,
            messages_processed=self.processed,
            queue_depth=self.inbox.qsize(),
            queue_capacity=self.config.queue_size,
            output_queue_depth=self.outbox.qsize(),
        )


@pytest.fixture
def inline() -> Iterator[str]:
    register_backend("inline", InlineBackend)
    try:
        yield "inline"
    finally:
        registry.unregister_backend("inline")


async def test_a_registered_backend_runs_a_kernel(inline: str) -> None:
    assert inline in backend_names()

    @ring_kernel(backend=inline, auto_register=False)
    def double(x: int) -> int:
        return 2 * x

    async with RingKernelRuntime() as rt:
        async with rt.kernel_scope("double", double):
            for i in range(5):
                await rt.send("double", i)
            assert [await rt.receive("double", timeout=5) for _ in range(5)] == [
                0,
                2,
                4,
                6,
                8,
            ]
            tele = rt.get_telemetry("double")
            assert tele is not None and tele.backend == "inline"
            assert tele.messages_processed == 5


async def test_a_registered_backend_reports_failure(inline: str) -> None:
    from pydotcompute import KernelFailedError, KernelState

    def boom(x: int) -> int:
        raise ValueError(f"bad {x}")

    async with RingKernelRuntime() as rt:
        await rt.launch("boom", boom, backend=inline)
        await rt.activate("boom")
        await rt.send("boom", 7)
        for _ in range(200):
            if rt.get_kernel_state("boom") is KernelState.FAILED:
                break
            await asyncio.sleep(0.01)
        assert rt.get_kernel_state("boom") is KernelState.FAILED
        with pytest.raises(KernelFailedError) as info:
            await rt.send("boom", 8)
        assert info.value.failed_message == 7


def test_unknown_backend_names_the_registered_ones() -> None:
    with pytest.raises(InvalidConfigurationError, match="'host', 'cpu', 'cuda'"):
        ring_kernel(backend="nope", auto_register=False)(lambda m, o, s: True)


def test_registering_a_name_twice_needs_replace(inline: str) -> None:
    with pytest.raises(InvalidConfigurationError, match="already registered"):
        register_backend(inline, InlineBackend)
    register_backend(inline, InlineBackend, replace=True)


def test_only_backend_classes_register() -> None:
    with pytest.raises(InvalidConfigurationError, match="KernelBackend subclass"):
        register_backend("bad", object)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigurationError, match="reserved|non-empty"):
        register_backend("auto", InlineBackend)
    with pytest.raises(InvalidConfigurationError, match="built-in"):
        registry.unregister_backend("cpu")


def test_a_backend_by_path_is_imported_on_first_launch(inline: str) -> None:
    register_backend("by_path", f"{__name__}:InlineBackend")
    try:
        assert registry.backend_class("by_path") is InlineBackend
        register_backend("missing", "no_such_module_here:Backend", replace=True)
        with pytest.raises(BackendNotAvailableError, match="'missing' backend cannot be loaded"):
            registry.backend_class("missing")
    finally:
        registry.unregister_backend("by_path")
        registry.unregister_backend("missing")


def test_async_actors_need_an_actor_backend(inline: str) -> None:
    async def actor(ctx: Any) -> None:
        return None

    with pytest.raises(InvalidConfigurationError, match="async def actor"):
        ring_kernel(backend=inline, auto_register=False)(actor)


def test_naming_a_builtin_imports_nothing() -> None:
    """Declaring a cuda kernel does not import the cuda backend (numba-cuda)."""
    code = (
        "import sys, numpy as np\n"
        "from pydotcompute import ring_kernel\n"
        "@ring_kernel(backend='cuda', input_type=np.dtype(np.float64), auto_register=False)\n"
        "def h(msg, out, state):\n"
        "    return True\n"
        "assert 'pydotcompute.backends.cuda' not in sys.modules, 'imported'\n"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_entry_points_register_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    ep = metadata.EntryPoint(
        name="from_ep", value=f"{__name__}:InlineBackend", group=registry.ENTRY_POINT_GROUP
    )

    def entry_points(group: str) -> list[metadata.EntryPoint]:
        return [ep] if group == registry.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(registry.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_entry_points_read", False)
    try:
        assert registry.backend_class("from_ep") is InlineBackend
        assert "from_ep" in backend_names()
    finally:
        registry.unregister_backend("from_ep")


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("pydotcompute.backends.base", "KernelLoop", "KernelBackend"),
        ("pydotcompute.backends.host", "HostKernelLoop", "HostKernelBackend"),
        ("pydotcompute.backends.ring_fed", "RingFedLoop", "RingFedBackend"),
    ],
)
def test_former_backend_names_still_import_with_a_warning(module: str, old: str, new: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new}"):
        assert getattr(mod, old) is getattr(mod, new)
    with pytest.raises(AttributeError):
        mod.no_such_name  # noqa: B018


def test_no_module_shadows_the_standard_library() -> None:
    import pkgutil

    import pydotcompute

    stdlib = sys.stdlib_module_names
    for info in pkgutil.walk_packages(pydotcompute.__path__, "pydotcompute."):
        leaf = info.name.rpartition(".")[2]
        assert leaf not in stdlib or leaf in {"__main__"}, info.name
