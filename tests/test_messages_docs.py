"""The examples in docs/messages.md run as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "messages.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_example_runs(index: int) -> None:
    # A real module, as a reader's script would be: dataclasses and type hints look
    # their class's module up in sys.modules.
    module = types.ModuleType(f"messages_doc_example_{index}")
    sys.modules[module.__name__] = module
    try:
        code = compile(BLOCKS[index], f"{DOC.name} example {index}", "exec", dont_inherit=True)
        exec(code, module.__dict__)
    finally:
        del sys.modules[module.__name__]
