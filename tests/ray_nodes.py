"""A Ray cluster of two nodes on this machine, started the way docs/scale-out.md says.

``ray start --head`` and ``ray start --address`` run as ``--block`` processes, each in a
session of its own: stopping them ends exactly the processes they started (SIGTERM,
then SIGKILL to the session's process group), never another Ray on the machine, which
``ray stop`` would. Token authentication is on, with a token of the cluster's own: the
nodes and every driver get ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (see
``Nodes.env``). Every port is a free one and everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class NoCluster(Exception):
    """A Ray cluster cannot be started here; the text says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Nodes:
    gcs: str  # "127.0.0.1:port": cluster="..." and ray_hop.py --address
    client: str  # "ray://127.0.0.1:port": the head's Ray Client server
    env: dict[str, str]  # what a driver needs in its environment (the auth token)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in self.logs if p.exists())


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the node's session (raylet, GCS, workers, agents): a short grace for a clean
    exit, then SIGKILL to every process left in it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=2.0)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextlib.contextmanager
def two_nodes(head: dict[str, float], other: dict[str, float]) -> Iterator[Nodes]:
    """A head node offering the custom resources ``head`` and a second node offering
    ``other``, one CPU each."""
    ray_cli = shutil.which("ray")
    if ray_cli is None:
        raise NoCluster("the ray command is not installed (pip install 'pydotcompute[ray]')")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Workers import this tree's pydotcompute (the one the drivers use).
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    folder = Path(tempfile.mkdtemp(prefix="pdc-ray-"))
    gcs, client = free_port(), free_port()
    try:
        import grpc  # noqa: F401 - the head serves Ray Client only with ray[client]
    except ImportError:
        client = 0
    nodes = Nodes(
        f"127.0.0.1:{gcs}",
        f"ray://127.0.0.1:{client}" if client else "",
        env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": env["RAY_AUTH_TOKEN"]},
    )
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1"]
    try:
        nodes.logs.append(folder / "head.log")
        nodes.procs.append(
            _start(
                [
                    ray_cli,
                    "start",
                    "--head",
                    f"--port={gcs}",
                    *common,
                    f"--resources={json.dumps(head)}",
                    "--include-dashboard=false",
                    *([f"--ray-client-server-port={client}"] if client else []),
                    f"--dashboard-agent-listen-port={free_port()}",
                ],
                env,
                nodes.logs[-1],
            )  # fmt: skip
        )
        _wait_for_nodes(nodes, 1)
        nodes.logs.append(folder / "node.log")
        nodes.procs.append(
            _start(
                [
                    ray_cli,
                    "start",
                    f"--address={nodes.gcs}",
                    *common,
                    f"--resources={json.dumps(other)}",
                    f"--dashboard-agent-listen-port={free_port()}",
                ],
                env,
                nodes.logs[-1],
            )  # fmt: skip
        )
        _wait_for_nodes(nodes, 2)
        yield nodes
    finally:
        for proc in reversed(nodes.procs):
            _stop(proc)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_nodes(nodes: Nodes, count: int, limit: float = 120.0) -> None:
    """Until ``ray status`` (as a driver with the token) counts ``count`` live nodes."""
    deadline = time.monotonic() + limit
    while True:
        for proc in nodes.procs:
            if proc.poll() is not None:
                raise NoCluster(f"a Ray node exited with {proc.returncode}:\n{nodes.tail()}")
        status = subprocess.run(
            ["ray", "status", f"--address={nodes.gcs}"],
            env={**os.environ, **nodes.env},
            capture_output=True,
            text=True,
        )
        # "Active:" lists one line per live node: " 1 node_<hex id>".
        if (
            status.returncode == 0
            and len(re.findall(r"\b1 node_[0-9a-f]{16,}", status.stdout)) >= count
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} Ray node(s) not up in {limit} s:\n{status.stdout}"
                               f"{status.stderr}\n{nodes.tail()}")  # fmt: skip
        time.sleep(1.0)
