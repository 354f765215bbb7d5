"""A throwaway PostgreSQL server for tests and benchmarks.

``PYDOTCOMPUTE_TEST_POSTGRES`` (a DSN) names a server to use instead. Otherwise the
server's own binaries (``initdb`` on PATH or under /usr/lib/postgresql/*/bin) make a
data directory in a temporary directory and run a server on 127.0.0.1 only, on a free
port, with its unix socket in that directory; stopping it removes everything. As root
(which initdb refuses) the server runs as the ``postgres`` system user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

ENV = "PYDOTCOMPUTE_TEST_POSTGRES"
DATABASE = "pydotcompute_test"


class NoServer(Exception):
    """No PostgreSQL server can be had here; the text says why."""


def find_bin_dir() -> Path:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if not found:
        raise NoServer(
            f"no PostgreSQL binaries (initdb on PATH or in /usr/lib/postgresql/*/bin) and {ENV} "
            "is not set"
        )
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A throwaway server that a test may stop, start and restart (as an operator or a
    failover would) while clients are connected."""

    def __init__(self, bin_dir: Path, data: Path, log: Path, prefix: list[str]) -> None:
        self.bin_dir, self.data, self.log, self.prefix = bin_dir, data, log, prefix
        self.dsn = ""
        self.opts = ""  # the server's command-line options: port, socket directory
        self.running = False

    def run(self, *args: str) -> None:
        proc = subprocess.run([*self.prefix, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {proc.stdout}{proc.stderr}{tail}")

    def pg_ctl(self, *args: str) -> None:
        self.run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), *args)

    def stop(self) -> None:
        """Stop now: sessions are ended, open transactions rolled back (``-m fast``)."""
        self.pg_ctl("-m", "fast", "-w", "stop")
        self.running = False

    def start(self) -> None:
        """Start again, on the same port, with the same options; returns once it accepts
        connections."""
        self.pg_ctl("-l", str(self.log), "-o", self.opts, "-w", "-t", "60", "start")
        self.running = True

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: what an operator's restart does to clients."""
        self.pg_ctl("-l", str(self.log), "-m", "fast", "-w", "-t", "60", "restart")
        self.running = True


@contextlib.contextmanager
def throwaway() -> Iterator[Server]:
    """Start a server with an empty database on it, then stop and remove it."""
    bin_dir = find_bin_dir()
    prefix: list[str] = []
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise NoServer(
                "running as root and there is no 'postgres' user to run initdb"
            ) from None
        runuser = shutil.which("runuser")
        if runuser is None:
            raise NoServer("running as root and runuser is missing to run initdb as 'postgres'")
        prefix = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="pdc-pg-"))
    data, log = root / "data", root / "server.log"
    srv = Server(bin_dir, data, log, prefix)
    try:
        if user is not None:
            os.chown(root, user.pw_uid, user.pw_gid)
        srv.run(
            str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        for attempt in range(5):
            port = free_port()
            opts = (
                f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
                "-c max_connections=200"
            )
            srv.opts = opts
            try:
                srv.start()
                break
            except RuntimeError:
                if attempt == 4:  # a port taken between free_port and the server's bind
                    raise
        try:
            import psycopg

            base = f"postgresql://postgres@127.0.0.1:{port}"
            with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {DATABASE}")
            srv.dsn = f"{base}/{DATABASE}"
            yield srv
        finally:
            if srv.running:
                srv.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def throwaway_server() -> Iterator[str]:
    """Start a server, yield the DSN of an empty database on it, then stop and remove it."""
    with throwaway() as srv:
        yield srv.dsn


@contextlib.contextmanager
def server() -> Iterator[str]:
    """The DSN of the server named by PYDOTCOMPUTE_TEST_POSTGRES, else of a throwaway one."""
    dsn = os.environ.get(ENV)
    if dsn:
        yield dsn
        return
    with throwaway_server() as dsn:
        yield dsn


@contextlib.contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """A DSN whose connections make and see tables only in a new, empty schema."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in dsn else "?"
    try:
        yield f"{dsn}{sep}options={quote(f'-csearch_path={name}', safe='')}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")
