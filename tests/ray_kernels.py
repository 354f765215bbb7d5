"""Kernels that the Ray tests place on actors: a module the actors' processes import."""

from __future__ import annotations

import numpy as np

from pydotcompute import message

SEQ = np.dtype([("seq", np.int64), ("value", np.float64)])


@message
class Point:
    x: float
    y: float


@message
class Norm:
    n: float


def norm(msg, out, state):  # type: ignore[no-untyped-def]
    out.n = (msg.x * msg.x + msg.y * msg.y) ** 0.5
    for i in range(16):
        out.correlation_id[i] = msg.message_id[i]
    return True


def half(msg, out, state):  # type: ignore[no-untyped-def]
    out.n = msg.n / 2
    for i in range(16):
        out.correlation_id[i] = msg.message_id[i]
    return True


def plus_one(msg, out, state):  # type: ignore[no-untyped-def]
    out.seq = msg.seq
    out.value = msg.value + 1.0
    state[0] += 1
    return True


async def doubler(ctx):  # type: ignore[no-untyped-def]
    while not ctx.should_terminate:
        msg = await ctx.receive()
        await ctx.send(msg * 2)


async def breaks_on_13(ctx):  # type: ignore[no-untyped-def]
    while not ctx.should_terminate:
        msg = await ctx.receive()
        if msg == 13:
            raise ZeroDivisionError("kernel fails on 13")
        await ctx.send(msg)


async def answers_once(ctx):  # type: ignore[no-untyped-def]
    msg = await ctx.receive()
    await ctx.send(msg + 1)


async def groups(ctx):  # type: ignore[no-untyped-def]
    """Takes what has arrived together (waiting 50 ms for more after the first) and
    answers each ``(x, sizes)`` with ``(10 x, sizes + [how many came together])``: a
    caller that sends one request and waits for its reply sees groups of one."""
    import asyncio

    while not ctx.should_terminate:
        held = [await ctx.receive()]
        while len(held) < 64:
            try:
                held.append(await ctx.receive(timeout=0.05))
            except asyncio.TimeoutError:
                break
        for x, sizes in held:
            await ctx.send((x * 10, [*sizes, len(held)]))


async def forwards(ctx):  # type: ignore[no-untyped-def]
    """Takes ``(target, n)``: sends ``0 .. n-1`` to kernel ``target`` with ``send_to``,
    then answers ``("queued", n)``, or ``("error", name, text)`` when a send_to fails."""
    while not ctx.should_terminate:
        target, n = await ctx.receive()
        try:
            for i in range(n):
                await ctx.send_to(target, i)
        except Exception as exc:  # noqa: BLE001 - the test reads what the sender saw
            await ctx.send(("error", type(exc).__name__, str(exc)))
            continue
        await ctx.send(("queued", n))
