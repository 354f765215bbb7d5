"""Code written for PyDotCompute 0.2.0 runs here: its runtime API, message helpers and
module paths, each held to what PyDotCompute's docs and tests expect of it."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
import uuid
from dataclasses import dataclass, field

import pytest

from pydotcompute import (
    AmbiguousMessageTypeError,
    KernelContext,
    KernelHandle,
    KernelState,
    KernelStateError,
    MessageDeserializationError,
    RingKernelConfig,
    RingKernelMessage,
    RingKernelRuntime,
    deserialize_message,
    get_loop_info,
    get_message_type,
    message,
    ring_kernel,
)
from pydotcompute.errors import InvalidConfigurationError
from pydotcompute.module_aliases import MODULE_ALIASES


async def echo(ctx):  # type: ignore[no-untyped-def]
    # The shape of PyDotCompute's documented actors.
    while not ctx.should_terminate:
        if not ctx.is_active:
            await ctx.wait_active()
            continue
        try:
            msg = await ctx.receive(timeout=0.1)
            await ctx.send(msg)
        except Exception:
            continue


# -- the runtime's own state: start() and is_active ----------------------------------


async def test_is_active_is_true_from_start_until_shutdown():
    rt = RingKernelRuntime()
    assert rt.is_active is False
    await rt.launch("e", echo)  # launching does not need start(), as in PyDotCompute
    assert rt.is_active is False
    await rt.start()
    await rt.start()  # idempotent
    assert rt.is_active is True
    await rt.shutdown()
    assert rt.is_active is False and rt.kernel_ids == []
    with pytest.raises(KernelStateError, match="shut down"):
        await rt.start()


async def test_async_with_starts_the_runtime():
    async with RingKernelRuntime() as rt:
        assert rt.is_active
    assert not rt.is_active


async def test_whether_a_kernel_is_active_is_asked_by_its_id():
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo)
        assert rt.is_kernel_active("e") is False
        await rt.activate("e")
        assert rt.is_kernel_active("e") is True


# -- launch's handle and kernel_scope ---------------------------------------------------


async def test_launch_returns_a_live_handle_on_that_launch():
    async with RingKernelRuntime() as rt:
        handle = await rt.launch("e", echo, queue_size=64, input_type=int)
        assert isinstance(handle, KernelHandle)
        assert (handle.kernel_id, handle.state, handle.backend) == (
            "e",
            KernelState.LAUNCHED,
            "host",
        )
        assert handle.config.queue_size == 64 and handle.input_type is int
        assert handle.output_type is None and handle.error is None
        await rt.activate("e")
        assert handle.state is KernelState.ACTIVE
        await rt.terminate("e")
        again = await rt.launch("e", echo)
        assert handle.state is KernelState.TERMINATED  # still the first launch
        assert again.state is KernelState.LAUNCHED
        assert "TERMINATED" in repr(handle)


async def test_a_failed_kernels_handle_holds_its_error():
    async def crash(ctx):  # type: ignore[no-untyped-def]
        await ctx.receive()
        raise ValueError("boom")

    async with RingKernelRuntime() as rt:
        handle = await rt.launch("c", crash)
        await rt.activate("c")
        await rt.send("c", 1)
        for _ in range(100):
            if handle.state is KernelState.FAILED:
                break
            await asyncio.sleep(0.01)
        assert handle.state is KernelState.FAILED and isinstance(handle.error, ValueError)


async def test_kernel_scope_runs_an_active_kernel_for_the_block_only():
    async with RingKernelRuntime() as rt:
        async with rt.kernel_scope("scoped", echo, queue_size=8) as kernel:
            assert kernel.state is KernelState.ACTIVE and kernel.config.queue_size == 8
            await rt.send("scoped", "hi")
            assert await rt.receive("scoped", timeout=1) == "hi"
        assert kernel.state is KernelState.TERMINATED
        assert "scoped" not in rt.kernel_ids


async def test_kernel_scope_terminates_when_the_block_raises():
    async with RingKernelRuntime() as rt:
        with pytest.raises(RuntimeError, match="inside"):
            async with rt.kernel_scope("scoped", echo) as kernel:
                raise RuntimeError("inside")
        assert kernel.state is KernelState.TERMINATED


async def test_kernel_scope_leaves_alone_a_kernel_launched_again_inside_it():
    async with RingKernelRuntime() as rt:
        async with rt.kernel_scope("scoped", echo):
            await rt.terminate("scoped")
            successor = await rt.launch("scoped", echo)
        assert successor.state is KernelState.LAUNCHED


async def test_launch_takes_a_whole_config():
    async with RingKernelRuntime() as rt:
        handle = await rt.launch("e", echo, config=RingKernelConfig(queue_size=3))
        assert handle.config.queue_size == 3
        other = await rt.launch("f", echo, config=RingKernelConfig(queue_size=3), queue_size=5)
        assert other.config.queue_size == 5  # single overrides still apply on top
        with pytest.raises(InvalidConfigurationError, match="RingKernelConfig"):
            await rt.launch("g", echo, config={"queue_size": 3})


def test_ring_kernel_takes_pydotcomputes_input_queue_size():
    @ring_kernel(kernel_id="sized", input_queue_size=500, grid_size=2, auto_register=False)
    async def sized(ctx):  # type: ignore[no-untyped-def]
        await ctx.receive()

    config = sized.__ring_kernel__.config
    assert config.queue_size == 500 and "input_queue_size" not in config.extra
    assert config.extra == {"grid_size": 2}  # kept for backends that read it


def test_kernel_context_takes_type_parameters():
    async def typed(ctx: KernelContext[int, str]) -> None:
        await ctx.send(str(await ctx.receive()))

    assert KernelContext[int, str] is not None  # subscriptable at run time too


# -- telemetry and summary ------------------------------------------------------------


async def test_summary_has_pydotcomputes_keys_besides_ours():
    async with RingKernelRuntime() as rt:
        await rt.launch("a", echo)
        await rt.launch("b", echo)
        await rt.activate("a")
        for i in range(5):
            assert await rt.send_and_receive("a", i, timeout=1) == i
        await rt.terminate("b")
        summary = rt.get_summary()
        assert summary["kernel_count"] == 1 and summary["kernels"] == 2
        assert summary["total_messages_processed"] == summary["messages_processed"] >= 4
        assert summary["total_messages_dropped"] == summary["messages_dropped"] == 0
        assert summary["total_errors"] == summary["errors"] == 0


async def test_telemetry_disabled_gives_none_and_an_empty_dict():
    async with RingKernelRuntime(enable_telemetry=False) as rt:
        await rt.launch("e", echo)
        assert rt.get_telemetry("e") is None
        assert rt.get_all_telemetry() == {}
        assert rt.get_summary()["kernel_count"] == 1
    async with RingKernelRuntime() as rt:
        await rt.launch("e", echo)
        snapshot = rt.get_telemetry("e")
        assert snapshot is not None and snapshot.kernel_id == "e"
        assert set(rt.get_all_telemetry()) == {"e"}


# -- the event loop ---------------------------------------------------------------------

LOOP_KEYS = {
    "loop_class",
    "uvloop_available",
    "uvloop_installed",
    "eager_tasks_available",
    "eager_tasks_installed",
    "platform",
    "python_version",
}


async def test_loop_info_names_the_running_loop():
    async with RingKernelRuntime() as rt:
        info = rt.get_loop_info()
    assert set(info) == LOOP_KEYS | {"runtime_uvloop_installed", "runtime_eager_tasks_installed"}
    assert info["loop_class"] == type(asyncio.get_running_loop()).__name__
    assert info["uvloop_installed"] is False  # the suite runs on asyncio's own loop
    assert info["runtime_uvloop_installed"] is False  # never installed by the runtime
    assert info["eager_tasks_available"] is (sys.version_info >= (3, 12))
    assert info["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert info["platform"] == sys.platform


def test_loop_info_outside_a_loop():
    info = get_loop_info()
    assert set(info) == LOOP_KEYS
    assert info["loop_class"] == "no_running_loop" and info["eager_tasks_installed"] is False


def test_loop_info_sees_uvloop_when_the_program_runs_on_it():
    uvloop = pytest.importorskip("uvloop")

    async def ask() -> dict[str, str | bool]:
        return get_loop_info()

    info = uvloop.run(ask()) if hasattr(uvloop, "run") else asyncio.run(ask())
    assert info["uvloop_available"] is True
    if hasattr(uvloop, "run"):
        assert info["uvloop_installed"] is True and info["loop_class"] == "Loop"


# -- message helpers ----------------------------------------------------------------------


@message
class GaugeReading:
    value: float = 0.0


def test_deserialize_message_decodes_any_registered_type():
    original = GaugeReading(value=2.5, priority=7)
    restored = deserialize_message(original.serialize())
    assert type(restored) is GaugeReading and restored == original
    base = deserialize_message(RingKernelMessage(priority=100).serialize())
    assert type(base) is RingKernelMessage and base.priority == 100
    with pytest.raises(MessageDeserializationError):
        deserialize_message(b"\x92\xa7Nowhere\x80")  # a type nobody registered


def test_get_message_type_by_registered_or_bare_class_name():
    assert get_message_type(GaugeReading.__message_type__) is GaugeReading
    assert get_message_type("GaugeReading") is GaugeReading  # PyDotCompute's key: the class name
    assert get_message_type("NoSuchMessage") is None


def test_get_message_type_refuses_a_bare_name_two_classes_share():
    def define() -> type:
        @message
        class Twin:
            x: int = 0

        return Twin

    first, second = define(), define()  # same qualname: the second replaces the first
    assert get_message_type("Twin") is second

    class Holder:
        @message
        class Twin:
            y: int = 0

    with pytest.raises(AmbiguousMessageTypeError, match="2 message classes"):
        get_message_type("Twin")
    assert get_message_type(Holder.Twin.__message_type__) is Holder.Twin
    assert first is not second


def test_with_correlation_copies_with_the_same_id():
    msg = GaugeReading(value=1.0)
    correlation = uuid.uuid4()
    copy = msg.with_correlation(correlation)
    assert copy.correlation_id == correlation and copy.message_id == msg.message_id
    assert copy.value == 1.0 and msg.correlation_id is None


# -- module paths ------------------------------------------------------------------------


@pytest.mark.parametrize("alias", sorted(MODULE_ALIASES))
def test_every_documented_module_path_imports_with_its_names(alias: str) -> None:
    module = importlib.import_module(alias)
    assert module.__all__
    for source in MODULE_ALIASES[alias]:
        origin, _, name = source.partition(":")
        target = importlib.import_module(origin)
        for n in [name] if name else target.__all__:
            assert getattr(module, n) is getattr(target, n)


def test_the_names_pydotcomputes_docs_import_from_its_paths():
    from pydotcompute.core.memory_pool import get_memory_pool
    from pydotcompute.core.unified_buffer import UnifiedBuffer
    from pydotcompute.decorators.ring_kernel import ring_kernel as decorator
    from pydotcompute.exceptions import KernelNotFoundError, PyDotComputeError, QueueFullError
    from pydotcompute.ring_kernels.lifecycle import KernelContext as Ctx
    from pydotcompute.ring_kernels.lifecycle import KernelState as State
    from pydotcompute.ring_kernels.lifecycle import RingKernelConfig as Config
    from pydotcompute.ring_kernels.message import message as decorate
    from pydotcompute.ring_kernels.queue import BackpressureStrategy
    from pydotcompute.ring_kernels.runtime import RingKernelRuntime as Runtime

    assert (Ctx, State, Config, Runtime, decorator, decorate) == (
        KernelContext,
        KernelState,
        RingKernelConfig,
        RingKernelRuntime,
        ring_kernel,
        message,
    )
    assert issubclass(QueueFullError, PyDotComputeError) and KernelNotFoundError
    assert BackpressureStrategy.DROP_OLDEST and UnifiedBuffer((2,)).host.shape == (2,)
    assert callable(get_memory_pool)


def _fresh_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_importing_the_package_makes_no_alias_module():
    out = _fresh_python(
        "import sys, pydotcompute\n"
        "print(sorted(m for m in sys.modules if m.startswith(('pydotcompute.ring_kernels',"
        " 'pydotcompute.core', 'pydotcompute.exceptions', 'pydotcompute.decorators'))))\n"
        "print(sum(getattr(f, 'pydotcompute_aliases', False) for f in sys.meta_path))\n"
        "import importlib; importlib.reload(pydotcompute)\n"
        "print(sum(getattr(f, 'pydotcompute_aliases', False) for f in sys.meta_path))\n"
    )
    assert out.split("\n")[:3] == ["[]", "1", "1"]


def test_a_package_alias_keeps_its_own_name_over_a_submodule_of_that_name():
    # Submodule first, then the package's name: the decorator, not the module, as in
    # PyDotCompute itself.
    out = _fresh_python(
        "from pydotcompute.ring_kernels.message import get_message_type\n"
        "from pydotcompute.decorators.ring_kernel import ring_kernel as a\n"
        "from pydotcompute.ring_kernels import message\n"
        "from pydotcompute.decorators import ring_kernel as b\n"
        "print(callable(message), type(message).__name__, a is b)\n"
    )
    assert out.strip() == "True function True"


def test_an_unknown_path_under_the_package_still_fails_to_import():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("pydotcompute.ring_kernels.fast_queue")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("pydotcompute.nothing_here")


# -- a program from PyDotCompute's testing guide, unchanged ----------------------------


@message
@dataclass
class EchoRequest:
    value: str
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)
    priority: int = 128
    correlation_id: uuid.UUID | None = None


@message
@dataclass
class EchoResponse:
    value: str
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)
    priority: int = 128
    correlation_id: uuid.UUID | None = None


@ring_kernel(kernel_id="echo", auto_register=False)
async def echo_actor(ctx):  # type: ignore[no-untyped-def]
    while not ctx.should_terminate:
        if not ctx.is_active:
            await ctx.wait_active()
            continue
        try:
            msg = await ctx.receive(timeout=0.1)
            await ctx.send(EchoResponse(value=msg.value, correlation_id=msg.message_id))
        except:  # noqa: E722 - as the guide writes it
            continue


async def test_the_testing_guides_echo_actor_runs_unchanged():
    async with RingKernelRuntime() as runtime:
        await runtime.launch("echo", echo_actor)
        await runtime.activate("echo")
        await asyncio.sleep(0.1)
        request = EchoRequest(value="hello")
        await runtime.send("echo", request)
        response = await runtime.receive("echo", timeout=1.0)
        assert response.value == "hello"
        assert response.correlation_id == request.message_id
