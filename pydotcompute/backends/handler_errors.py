"""Errors of handlers and actors, told in the user's terms: which line, what to do.

A crash is told in a few lines that start at the user's file and line (the last
frame of the traceback in the handler's file) rather than in the backend's loop.
"""

from __future__ import annotations

import linecache
import os
import reprlib
import traceback
from collections.abc import Callable
from typing import Any

__all__ = [
    "describe_crash",
    "python_function",
    "user_frame",
]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPR = reprlib.Repr()
_REPR.maxstring = 120
_REPR.maxother = 160


def python_function(func: Callable[..., Any]) -> Callable[..., Any]:
    """The Python function behind a numba dispatcher (or ``func`` itself)."""
    return getattr(func, "py_func", func)


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", repr(func))


def _source_file(func: Callable[..., Any]) -> str | None:
    code = getattr(python_function(func), "__code__", None)
    return os.path.abspath(code.co_filename) if code is not None else None


def _site(path: str, line: int, name: str) -> str:
    """A traceback-style location, followed by the source line when it can be read."""
    text = linecache.getline(path, line).strip()
    out = f'  File "{path}", line {line}, in {name}'
    return out + (f"\n    {text}" if text else "")


def _def_site(func: Callable[..., Any]) -> str:
    code = getattr(python_function(func), "__code__", None)
    if code is None:
        return f"  in {_name(func)}"
    return _site(code.co_filename, code.co_firstlineno, code.co_name)


# -- exceptions raised while running -----------------------------------------------


def user_frame(exc: BaseException, func: Callable[..., Any]) -> traceback.FrameSummary | None:
    """The frame of ``exc``'s traceback to show a user: the last one in the file of
    ``func`` (the handler or actor), else the last one outside this package."""
    frames = traceback.extract_tb(exc.__traceback__)
    home = _source_file(func)
    if home is not None:
        for frame in reversed(frames):
            if os.path.abspath(frame.filename) == home:
                return frame
    for frame in reversed(frames):
        if not os.path.abspath(frame.filename).startswith(_PACKAGE_DIR):
            return frame
    return None


def describe_crash(
    kernel_id: str, exc: BaseException, func: Callable[..., Any], failed_input: Any
) -> str:
    """A few lines on a crash: the kernel, the message it held, the error, then the
    user's line that raised (or the handler's definition when no frame names one)."""
    held = "" if failed_input is None else f" on message {_REPR.repr(failed_input)}"
    head = f"kernel {kernel_id!r} failed{held}: {type(exc).__name__}: {exc}"
    frame = user_frame(exc, func)
    if frame is not None and frame.lineno is not None:
        return head + "\n" + _site(frame.filename, frame.lineno, frame.name)
    return head + f"\n{_def_site(func)}  (the line is unknown: compiled code)"
