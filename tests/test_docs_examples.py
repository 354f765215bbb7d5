"""Every ```python block in docs/ and every script in examples/ runs as written."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _doc_blocks() -> list[tuple[str, str]]:
    blocks = []
    for md in sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]):
        for i, code in enumerate(BLOCK.findall(md.read_text())):
            blocks.append((f"{md.relative_to(ROOT)}#{i + 1}", code))
    return blocks


def _examples() -> list[pathlib.Path]:
    return sorted((ROOT / "examples").glob("*.py"))


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYDOTCOMPUTE_EXAMPLE_QUICK": "1"}
    import os

    env = {**os.environ, **env}
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)


@pytest.mark.parametrize("name, code", _doc_blocks(), ids=[b[0] for b in _doc_blocks()])
def test_doc_block_runs(name: str, code: str) -> None:
    if "# doc: not run" in code:
        pytest.skip("marked as illustration only")
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 0, f"{name} failed:\n{out.stdout}\n{out.stderr}"


@pytest.mark.parametrize("path", _examples(), ids=[p.name for p in _examples()])
def test_example_runs(path: pathlib.Path) -> None:
    out = _run([sys.executable, str(path)])
    assert out.returncode == 0, f"{path.name} failed:\n{out.stdout}\n{out.stderr}"


def test_approval_example_stops_on_ctrl_c_without_a_traceback(tmp_path: pathlib.Path) -> None:
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYDOTCOMPUTE_EXAMPLE_QUICK"}
    env["PYTHONPATH"] = str(ROOT)
    journal = str(tmp_path / "claims.db")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "approval_server.py"), journal, str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        while "approve claims at" not in (line := proc.stdout.readline()):
            assert line, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in err, err
    assert "stopped; waiting claims stay in the journal" in out
    assert proc.returncode == 0
