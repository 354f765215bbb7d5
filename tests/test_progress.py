"""Progress bars of flow.drain() and flow.results(): on a terminal only."""

from __future__ import annotations

import os
import pathlib
import pty
import select
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pydotcompute.coordinator import deploy, stage

    async def slow(x):
        await asyncio.sleep(0.01)
        return x

    async def main():
        async with await deploy(None, stage(slow), name="slowpoke", journal=sys.argv[1] or None) as flow:
            await flow.submit_many(range(40))
            await flow.drain(progress=True)
            await flow.submit_many(range(40, 60))
            got = [k async for k, _ in flow.results(progress=True)]
            print("results", len(got), flush=True)

    asyncio.run(main())
    """
)


def run(tmp_path: pathlib.Path, journal: str, terminal: bool) -> tuple[str, str]:
    script = tmp_path / "slow.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FORCE_COLOR": "1", "COLUMNS": "100"}
    if not terminal:
        done = subprocess.run(
            [sys.executable, str(script), journal],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(script), journal],
        stdout=subprocess.PIPE, stderr=child, text=True, env=env,
    )  # fmt: skip
    os.close(child)
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=60)
    os.close(main)
    assert proc.returncode == 0, seen.decode(errors="replace")
    return out, seen.decode(errors="replace")


def test_a_terminal_sees_a_bar_of_the_flows_items(tmp_path: pathlib.Path) -> None:
    out, err = run(tmp_path, "", terminal=True)
    assert "results 60" in out
    assert "flow slowpoke" in err and "40/40" in err and "60/60" in err


def test_a_durable_flow_counts_its_journal(tmp_path: pathlib.Path) -> None:
    out, err = run(tmp_path, str(tmp_path / "j.db"), terminal=True)
    assert "40/40" in err and "60/60" in err


def test_no_bar_in_a_pipe_or_a_log(tmp_path: pathlib.Path) -> None:
    out, err = run(tmp_path, "", terminal=False)
    assert "results 60" in out
    assert err == ""  # FORCE_COLOR set, and still nothing
