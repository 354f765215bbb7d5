"""The runtime's extension point: what the layers above attach, and what it closes."""

from __future__ import annotations

import ast
import inspect

import pytest

import pydotcompute.runtime.runtime as runtime_module
from pydotcompute import KernelStateError, RingKernelRuntime, RuntimeExtension


class Recorder:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    async def close(self) -> None:
        self.log.append(self.name)


async def test_an_attached_extension_is_found_by_name_and_closed_at_shutdown():
    log: list[str] = []
    rt = RingKernelRuntime()
    first, second = Recorder(log, "first"), Recorder(log, "second")
    assert rt.extension("x") is None
    rt.attach("x", first)
    rt.attach("y", second)
    assert rt.extension("x") is first and isinstance(first, RuntimeExtension)
    await rt.shutdown()
    assert log == ["second", "first"]  # the last attached closes first
    with pytest.raises(KernelStateError):
        rt.check_open()
    with pytest.raises(KernelStateError):
        rt.attach("z", Recorder(log, "late"))


async def test_something_without_close_is_refused():
    async with RingKernelRuntime() as rt:
        with pytest.raises(TypeError, match="close"):
            rt.attach("x", object())  # type: ignore[arg-type]


async def test_the_workflow_engine_is_an_extension(tmp_path):
    async with RingKernelRuntime(journal=str(tmp_path / "j.db")) as rt:
        engine = rt.workflows()
        assert rt.extension("workflows") is engine
        assert rt.workflows() is engine


def test_the_runtime_module_imports_no_layer_above_it():
    above = ("pydotcompute.coordinator", "pydotcompute.workflows", "pydotcompute.cli")
    tree = ast.parse(inspect.getsource(runtime_module))
    for stmt in tree.body:  # module level only: a method may import on use
        names = []
        if isinstance(stmt, ast.Import):
            names = [a.name for a in stmt.names]
        elif isinstance(stmt, ast.ImportFrom) and stmt.module:
            names = [stmt.module]
        for name in names:
            assert not name.startswith(above), name
