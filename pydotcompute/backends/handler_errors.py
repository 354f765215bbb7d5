"""Errors of handlers and actors, told in the user's terms: which line, what to do.

A compiled handler fails in numba's words: a typing report of a few dozen lines that
ends in the backend's own loop, or an exception raised from a traceback that stops in
the backend's thread. This module turns either into a few lines that start at the
user's file and line, with the fix where one is known; numba's full report stays on
the error's ``__cause__``. It also refuses, at launch, what numba would compile into
nonsense (an f-string prints ``<object type:float64>``) or what would fail silently on
a GPU (numba-cuda drops exceptions raised in device code).
"""

from __future__ import annotations

import ast
import inspect
import linecache
import os
import re
import reprlib
import textwrap
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from pydotcompute.errors import KernelFailedError

__all__ = [
    "check_handler_source",
    "compile_error",
    "describe_crash",
    "python_function",
    "user_frame",
]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')
_AT_FILE_LINE = re.compile(r" at (\S+) \((\d+)\)")
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


# -- compile errors ------------------------------------------------------------------

# (pattern over numba's first lines, fix); the fix may use the pattern's groups.
_FIXES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"Untyped global name '(\w+)'.*<class 'function'>", re.S),
        "compiled handlers can call only compiled functions: decorate {0!r} with @numba.njit{gpu}",
    ),
    (
        re.compile(r"Untyped global name '(\w+)'.*<class 'module'>", re.S),
        "module {0!r} cannot be used in a compiled handler; numba compiles numbers, "
        "numpy arrays, math and @numba.njit functions",
    ),
    (
        re.compile(r"Untyped global name '(\w+)'", re.S),
        "{0!r} is a Python object numba cannot compile; a compiled handler sees only "
        "numbers, numpy arrays, tuples and @numba.njit functions",
    ),
    (
        re.compile(r"Unknown attribute '(\w+)' of type Record", re.S),
        "the record has no field {0!r}",
    ),
    (
        re.compile(r"unicode_type|Literal\[str\]|Cannot cast .*str", re.S),
        "records hold numbers only: a compiled handler cannot store or build strings",
    ),
    (
        re.compile(r"No implementation of function Function\(<built-in function (\w+)>", re.S),
        "numba has no {0}() for these argument types; convert the arguments "
        "(e.g. float(...)) or compute it another way",
    ),
)


def _numba_summary(text: str) -> str:
    """The lines of a numba report that say what is wrong (not where or during what)."""
    keep: list[str] = []
    for line in _ANSI.sub("", text).splitlines():
        s = line.strip()
        if not s or s.startswith(("Failed in ", "During:", "File ", "<source elided>", "^")):
            if keep and s.startswith(("File ", "During:")):
                break
            continue
        keep.append(s)
    return " ".join(keep)[:400] or type(text).__name__


def _report_site(text: str, func: Callable[..., Any]) -> tuple[str, int] | None:
    """The first place in the handler's own file that numba's report names."""
    home = _source_file(func)
    plain = _ANSI.sub("", text)
    for pattern in (_FILE_LINE, _AT_FILE_LINE):
        for path, line in pattern.findall(plain):
            full = os.path.abspath(path)
            if home is None or full == home:
                return full, int(line)
    return None


def _fields(dtype: np.dtype | None) -> tuple[str, ...]:
    return tuple(dtype.names or ()) if dtype is not None else ()


def _missing_field(
    func: Callable[..., Any], in_dtype: np.dtype | None, out_dtype: np.dtype | None
) -> tuple[int, str] | None:
    """(absolute line, fix) for a ``msg.x``/``out.x`` whose record has no field x."""
    parsed = _parse(func)
    if parsed is None:
        return None
    tree, first = parsed
    args = tree.args.args
    records = {}
    for arg, dtype, role in zip(args, (in_dtype, out_dtype), ("input", "output"), strict=False):
        if dtype is not None and dtype.names:
            records[arg.arg] = (dtype, role)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            found = records.get(node.value.id)
            if found is not None and node.attr not in _fields(found[0]):
                dtype, role = found
                return first + node.lineno - 1, (
                    f"the {role} record has no field {node.attr!r} "
                    f"(its fields: {', '.join(_fields(dtype))})"
                )
    return None


def compile_error(
    func: Callable[..., Any],
    kernel_id: str,
    backend: str,
    exc: BaseException,
    in_dtype: np.dtype | None = None,
    out_dtype: np.dtype | None = None,
) -> KernelFailedError:
    """A ``KernelFailedError`` for a handler that does not compile: its line first,
    numba's one-line summary, the fix where one is known. ``exc`` becomes its
    ``__cause__``, without numba's internal traceback (its text stays whole)."""
    text = str(exc)
    summary = _numba_summary(text) if text else type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1:  # numba's bare KeyError('field')
        summary = f"KeyError: {exc.args[0]!r}"
    site = _report_site(text, func)
    fix = None
    missing = _missing_field(func, in_dtype, out_dtype)
    if missing is not None and (site is None or isinstance(exc, KeyError)):
        code = python_function(func).__code__
        site, fix = (code.co_filename, missing[0]), missing[1]
    if fix is None:
        gpu = " (or @cuda.jit(device=True))" if backend == "cuda" else ""
        for pattern, hint in _FIXES:
            m = pattern.search(_ANSI.sub("", text))
            if m:
                fix = hint.format(*m.groups(), gpu=gpu)
                break
    where = _site(site[0], site[1], _name(func)) if site else _def_site(func)
    lines = [
        f"handler {_name(func)!r} of kernel {kernel_id!r} does not compile "
        f"for the {backend} backend:",
        where,
        f"  {summary}",
    ]
    if fix:
        lines.append(f"fix: {fix}")
    lines.append("(numba's full report is this error's __cause__)")
    err = KernelFailedError("\n".join(lines), kernel_id=kernel_id)
    err.__cause__ = exc.with_traceback(None)
    return err


# -- constructs refused at launch ----------------------------------------------------


def _parse(func: Callable[..., Any]) -> tuple[ast.FunctionDef, int] | None:
    """The handler's syntax tree and the file line its first source line is on; None
    when its source cannot be read (defined in a REPL or with ``exec``)."""
    py = python_function(func)
    try:
        lines, first = inspect.getsourcelines(py)
    except (OSError, TypeError):
        return None
    try:
        module = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError:
        return None
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node, first  # type: ignore[return-value]
    return None


_TEXT_CALLS = ("str", "repr", "format")


def _refusals(tree: ast.FunctionDef, gpu: bool) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            found.append(
                (
                    node.lineno,
                    "an f-string does not compile faithfully (a float comes out as "
                    "'<object type:float64>'); print the values as arguments: "
                    "print('x =', msg.x)",
                )
            )
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _TEXT_CALLS
        ):
            found.append(
                (
                    node.lineno,
                    f"{node.func.id}() does not compile faithfully (a float comes out as "
                    "'<object type:float64>'); print the values as arguments: "
                    "print('x =', msg.x)",
                )
            )
        elif gpu and isinstance(node, ast.Raise):
            found.append(
                (
                    node.lineno,
                    "numba-cuda drops exceptions raised on the GPU: this raise would "
                    "silently end one thread of the persistent kernel. Return False to "
                    "skip the record (and count it in state), or run the handler on the "
                    "cpu backend, where a raise fails the kernel",
                )
            )
    returns = [n for n in ast.walk(tree) if isinstance(n, ast.Return)]
    if not any(
        r.value is not None and not (isinstance(r.value, ast.Constant) and r.value.value is None)
        for r in returns
    ):
        found.append(
            (
                tree.lineno,
                "the handler never returns a value: return True to emit `out`, False to "
                "emit nothing for this record",
            )
        )
    return sorted(found)


def check_handler_source(
    func: Callable[..., Any], kernel_id: str, backend: str, *, gpu: bool = False
) -> None:
    """Refuse, naming the line, what would compile to nonsense: f-strings and
    ``str()``/``repr()``/``format()`` (numba formats a float as an object), a handler
    that never returns a value (it would never emit), and on a GPU (``gpu``) a
    ``raise`` (numba-cuda ignores it). Handlers whose source cannot be read are not
    checked."""
    parsed = _parse(func)
    if parsed is None:
        return
    tree, first = parsed
    found = _refusals(tree, gpu)
    if not found:
        return
    path = python_function(func).__code__.co_filename
    line, why = found[0]
    more = f"\n({len(found) - 1} more such line(s) in the handler)" if len(found) > 1 else ""
    raise KernelFailedError(
        f"handler {_name(func)!r} of kernel {kernel_id!r} cannot run on the {backend} "
        f"backend:\n{_site(path, first + line - 1, _name(func))}\n{why}{more}",
        kernel_id=kernel_id,
    )
