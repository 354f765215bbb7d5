"""The C++ control block (kernels/control.cuh) is generated from ``ControlBlock``: the
checked-in header is the generated one, and a C++ compiler reads the same values."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pydotcompute.backends.cuda_loop import ControlWords
from pydotcompute.backends.cuda_source import SourceControl
from pydotcompute.rings.control import ControlBlock

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
REGENERATE = (
    "python -c 'from pydotcompute.rings.control import ControlBlock; "
    'print(ControlBlock.cxx_header(), end="")\' > kernels/control.cuh'
)


def test_the_checked_in_header_is_the_generated_one():
    text = (KERNELS / "control.cuh").read_text(encoding="utf-8")
    assert text == ControlBlock.cxx_header(), f"kernels/control.cuh is stale: {REGENERATE}"


def test_the_python_word_indices_are_the_control_block_layout():
    for name in ("STATE", "PROCESSED", "IDLE_POLLS", "HEARTBEAT", "ERROR_CODE"):
        assert getattr(ControlWords, name) * 8 == getattr(ControlBlock, name)
    pairs = {
        "COMMAND": "STATE",
        "STATUS": "STATUS",
        "ERROR": "ERROR_CODE",
        "HEARTBEAT": "HEARTBEAT",
        "PROCESSED": "PROCESSED",
        "IDLE_POLLS": "IDLE_POLLS",
        "SEQ": "RESULTS_SEQ",
        "RESULTS": "RESULTS",
        "NWORDS": "NBYTES",
    }
    for word, field in pairs.items():
        assert getattr(SourceControl, word) * 8 == getattr(ControlBlock, field)
    # Every field on a line of its own but the pairs that share a writer.
    lines = [ControlBlock.STATE, *range(128, ControlBlock.NBYTES, 128)]
    assert ControlBlock.NBYTES % 128 == 0 and len(lines) == ControlBlock.NBYTES // 128
    assert ControlBlock.RESULTS < ControlBlock.NBYTES


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_a_cxx_compiler_reads_the_same_layout(tmp_path: Path):
    names = {
        "kState": ControlBlock.STATE // 8,
        "kWake": ControlBlock.WAKE // 8,
        "kProcessed": ControlBlock.PROCESSED // 8,
        "kEmitted": ControlBlock.EMITTED // 8,
        "kDropped": ControlBlock.DROPPED // 8,
        "kIdlePolls": ControlBlock.IDLE_POLLS // 8,
        "kErrors": ControlBlock.ERRORS // 8,
        "kHeartbeat": ControlBlock.HEARTBEAT // 8,
        "kErrorCode": ControlBlock.ERROR_CODE // 8,
        "kStatus": ControlBlock.STATUS // 8,
        "kBatches": ControlBlock.BATCHES // 8,
        "kResultsSeq": ControlBlock.RESULTS_SEQ // 8,
        "kResults": ControlBlock.RESULTS // 8,
        "kBytes": ControlBlock.NBYTES,
        "kWords": ControlBlock.NBYTES // 8,
        "kTerminate": ControlBlock.TERMINATE,
        "kHalt": ControlBlock.HALT,
        "kStatusFailed": ControlBlock.STATUS_FAILED,
        "kErrHandler": ControlBlock.ERR_HANDLER,
    }
    prints = "\n".join(f'  std::printf("{n} %llu\\n", pdc::control::{n});' for n in names)
    source = tmp_path / "layout.cpp"
    source.write_text(f'#include <cstdio>\n#include "control.cuh"\nint main() {{\n{prints}\n}}\n')
    exe = tmp_path / "layout"
    subprocess.run(
        ["g++", "-std=c++17", f"-I{KERNELS}", str(source), "-o", str(exe)], check=True, timeout=120
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    seen = {n: int(v) for n, v in (line.split() for line in out.splitlines())}
    assert seen == names
