"""Kernels the backend conformance suite runs on every backend (importable by Ray
workers, so they live in a module of their own)."""

from __future__ import annotations

from pydotcompute import message


@message
class Num:
    x: float


def double(msg, out, state):  # type: ignore[no-untyped-def]
    """Compiled: answers x with 2x; raises on a negative x."""
    if msg.x < 0.0:
        raise ValueError("negative")
    out.x = msg.x * 2.0
    return True


async def double_actor(ctx):  # type: ignore[no-untyped-def]
    """Host actor: the same behaviour as ``double``."""
    while True:
        msg = await ctx.receive()
        if msg.x < 0.0:
            raise ValueError("negative")
        await ctx.send(Num(x=msg.x * 2.0))
