"""Compiled (``cpu``) kernels that fail: errors that point at the handler's line, a
raise that fails the record and loses nothing, and outputs with a proper header."""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid

import numpy as np
import pytest

from pydotcompute import (
    KernelFailedError,
    KernelState,
    QueueTimeoutError,
    RingKernelRuntime,
    message,
)
from pydotcompute.backends.handler_errors import check_handler_source


@message
class Reading:
    x: float
    n: int


@message
class Result:
    y: float


def plain_helper(v):  # type: ignore[no-untyped-def]
    return v * 2.0


def doubles(msg, out, state):  # type: ignore[no-untyped-def]
    out.y = msg.x * 2.0
    return True


def calls_a_plain_function(msg, out, state):  # type: ignore[no-untyped-def]
    out.y = plain_helper(msg.x)
    return True


def writes_a_missing_field(msg, out, state):  # type: ignore[no-untyped-def]
    out.z = msg.x
    return True


def prints_an_fstring(msg, out, state):  # type: ignore[no-untyped-def]
    print(f"x = {msg.x}")
    out.y = msg.x
    return True


def formats_with_str(msg, out, state):  # type: ignore[no-untyped-def]
    print("x = " + str(msg.x))
    return True


def returns_nothing(msg, out, state):  # type: ignore[no-untyped-def]
    out.y = msg.x


def raises_on_negative(msg, out, state):  # type: ignore[no-untyped-def]
    if msg.x < 0:
        raise ValueError("negative reading")
    state[0] += 1.0
    out.y = msg.x
    return True


def line_of(func, text: str) -> int:  # type: ignore[no-untyped-def]
    lines, first = inspect.getsourcelines(func)
    return first + next(i for i, line in enumerate(lines) if text in line)


def cpu(**kw):  # type: ignore[no-untyped-def]
    return dict(backend="cpu", input_type=Reading, output_type=Result, queue_size=16, **kw)


# -- compile errors ----------------------------------------------------------------


async def test_a_compile_error_names_the_handler_line_and_the_fix(caplog) -> None:
    async with RingKernelRuntime() as rt:
        with pytest.raises(KernelFailedError) as info:
            await rt.launch("k", calls_a_plain_function, **cpu())
        assert rt.get_state("k") is KernelState.FAILED
    text = str(info.value)
    lines = text.splitlines()
    assert len(lines) <= 6, text
    assert f'File "{__file__}", line {line_of(calls_a_plain_function, "plain_helper(")}' in lines[1]
    assert "out.y = plain_helper(msg.x)" in lines[2]
    assert "@numba.njit" in text and "'plain_helper'" in text
    assert "itemsize" not in text and "\x1b[" not in text  # no dtype dump, no colours
    cause = info.value.__cause__
    assert type(cause).__name__ == "TypingError" and "plain_helper" in str(cause)
    assert cause.__traceback__ is None  # numba's internals are not printed again
    # Raised to the caller, so not also logged as a warning or an error.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_missing_record_field_is_named_with_the_fields_there_are() -> None:
    async with RingKernelRuntime() as rt:
        with pytest.raises(KernelFailedError) as info:
            await rt.launch("k", writes_a_missing_field, **cpu())
    text = str(info.value)
    assert f"line {line_of(writes_a_missing_field, 'out.z')}" in text
    assert "no field 'z'" in text and "y" in text


@pytest.mark.parametrize(
    ("handler", "text", "why"),
    [
        (prints_an_fstring, 'print(f"x = {msg.x}")', "f-string"),
        (formats_with_str, "str(msg.x)", "str()"),
        (returns_nothing, "def returns_nothing", "never returns a value"),
    ],
)
async def test_constructs_that_compile_to_nonsense_are_refused_at_launch(
    handler, text, why
) -> None:  # type: ignore[no-untyped-def]
    async with RingKernelRuntime() as rt:
        with pytest.raises(KernelFailedError) as info:
            await rt.launch("k", handler, **cpu())
    msg = str(info.value)
    assert f"line {line_of(handler, text)}" in msg and why in msg


def test_a_raise_is_refused_only_where_it_would_be_dropped() -> None:
    check_handler_source(raises_on_negative, "k", "cpu")  # a raise fails the kernel there
    with pytest.raises(KernelFailedError, match="drops exceptions raised on the GPU") as info:
        check_handler_source(raises_on_negative, "k", "cuda", gpu=True)
    assert f"line {line_of(raises_on_negative, 'raise ValueError')}" in str(info.value)


# -- a handler that raises ---------------------------------------------------------


async def test_a_raising_handler_fails_the_record_and_keeps_earlier_outputs() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("k", raises_on_negative, **cpu(state=np.zeros(1)))
        bad = Reading(x=-1.0, n=3)
        for m in (Reading(x=1.0, n=1), Reading(x=2.0, n=2), bad, Reading(x=4.0, n=4)):
            await rt.send("k", m)
        await rt.activate("k")  # all four go in one batch
        for _ in range(500):
            if rt.get_state("k") is KernelState.FAILED:
                break
            await asyncio.sleep(0.01)
        assert [(await rt.receive("k", timeout=1)).y for _ in range(2)] == [1.0, 2.0]
        with pytest.raises(KernelFailedError) as info:
            await rt.receive("k", timeout=1)
        err = info.value
        assert err.failed_message == bad
        text = str(err)
        assert "negative reading" in text
        assert f'File "{__file__}", line {line_of(raises_on_negative, "raise ValueError")}' in text
        tele = rt.get_telemetry("k")
        assert (tele.errors, tele.messages_sent, tele.messages_dropped) == (1, 2, 1)


async def test_a_restarted_cpu_kernel_handles_what_was_queued_after_the_bad_record() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch(
            "k",
            raises_on_negative,
            **cpu(state=np.zeros(1), restart="on-failure", restart_backoff=0.0),
        )
        xs = [1.0, -1.0, 3.0, 4.0, -2.0, 6.0]
        for x in xs:
            await rt.send("k", Reading(x=x, n=0))
        await rt.activate("k")
        got = []
        while len(got) < 4:
            got.append((await rt.receive("k", timeout=5)).y)
        assert got == [1.0, 3.0, 4.0, 6.0]  # in order, nothing lost but the two raisers
        tele = rt.get_telemetry("k")
        assert (tele.restarts, tele.errors, tele.messages_dropped) == (2, 2, 0)
        assert rt.get_state("k") is KernelState.ACTIVE
        # The state restarted from its declared value: only 6.0 came after the last.
        for _ in range(200):
            if rt.read_state("k")[0] == 1.0:
                break
            await asyncio.sleep(0.01)
        assert rt.read_state("k")[0] == 1.0


# -- the header of compiled outputs ------------------------------------------------


async def test_compiled_outputs_get_an_id_the_default_priority_and_a_correlation() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("k", doubles, **cpu())
        await rt.activate("k")
        sent = [Reading(x=float(i), n=i) for i in range(3)]
        replies = [await rt.send_and_receive("k", m, timeout=2) for m in sent]
        assert [r.correlation_id for r in replies] == [m.message_id for m in sent]
        assert {r.priority for r in replies} == {128}
        ids = {r.message_id for r in replies}
        assert len(ids) == 3 and uuid.UUID(int=0) not in ids
        assert {i.version for i in ids} == {4}
        # Record batches get their ids as they leave the ring too.
        recs = np.zeros(4, Reading.__record_dtype__)  # no ids: no correlation either
        await rt.send_batch("k", recs)
        out = await rt.receive_batch("k", 4, timeout=2)
        while len(out) < 4:
            out = np.concatenate([out, await rt.receive_batch("k", 4, timeout=2)])
        assert (out["priority"] == 128).all()
        assert not out["correlation_id"].any()
        assert out["message_id"].any(axis=1).all()
        assert len({bytes(r) for r in out["message_id"]}) == 4


def keeps_its_own_header(msg, out, state):  # type: ignore[no-untyped-def]
    out.priority = 7
    for i in range(16):
        out.message_id[i] = 1
    out.y = msg.x
    return True


async def test_a_header_the_handler_set_is_kept() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("k", keeps_its_own_header, **cpu())
        await rt.activate("k")
        reply = await rt.send_and_receive("k", Reading(x=1.0, n=0), timeout=2)
        assert reply.priority == 7 and reply.message_id.bytes == bytes([1] * 16)


async def test_a_compiled_kernel_never_activated_says_so_on_timeout() -> None:
    async with RingKernelRuntime() as rt:
        await rt.launch("k", doubles, **cpu())
        await rt.send("k", Reading(x=1.0, n=0))
        with pytest.raises(QueueTimeoutError, match="never activated"):
            await rt.receive("k", timeout=0.05)
        with pytest.raises(QueueTimeoutError, match="never activated"):
            await rt.receive_batch("k", 4, timeout=0.05)
