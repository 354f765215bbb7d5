"""What event loop the runtime runs on: ``get_loop_info()``.

The runtime never changes the event loop (no uvloop policy, no task factory): it runs
on whatever loop the program started. This reports which one that is, with the keys
PyDotCompute 0.2.0's ``get_loop_info`` has.
"""

from __future__ import annotations

import asyncio
import importlib.util
import platform
import sys

__all__ = ["get_loop_info"]


def _is_uvloop(obj: object) -> bool:
    return type(obj).__module__.partition(".")[0] == "uvloop"


def get_loop_info() -> dict[str, str | bool]:
    """The running event loop (or, outside one, the policy that would make it).

    Keys: ``loop_class`` (``"no_running_loop"`` outside a loop), ``uvloop_available``
    (importable here), ``uvloop_installed`` (the running loop, or else the current
    policy, is uvloop's), ``eager_tasks_available`` (Python 3.12+),
    ``eager_tasks_installed`` (the running loop starts tasks eagerly), ``platform``
    and ``python_version``.
    """
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    eager_factory = getattr(asyncio, "eager_task_factory", None)
    return {
        "loop_class": type(loop).__name__ if loop is not None else "no_running_loop",
        "uvloop_available": importlib.util.find_spec("uvloop") is not None,
        "uvloop_installed": _is_uvloop(loop)
        if loop is not None
        else _is_uvloop(asyncio.get_event_loop_policy()),
        "eager_tasks_available": eager_factory is not None,
        "eager_tasks_installed": loop is not None
        and eager_factory is not None
        and loop.get_task_factory() is eager_factory,
        "platform": sys.platform,
        "python_version": platform.python_version(),
    }
