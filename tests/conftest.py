"""Shared test configuration."""

from __future__ import annotations

import contextlib

import pytest


def _cuda_usable() -> bool:
    # The product's own probe: the simulator, a missing driver or CuPy all read as "no".
    from pydotcompute.device.probe import probe_cuda

    return probe_cuda().usable


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("gpu") for item in items) and not _cuda_usable():
        skip = pytest.mark.skip(reason="needs a usable CUDA GPU; none is present here")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres_server():
    """DSN of a PostgreSQL database for the whole session (see tests/postgres_server.py);
    skips, saying why, where no server can be had."""
    from tests import postgres_server as pg

    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip('psycopg is not installed: pip install "pydotcompute[postgres]"')
    with contextlib.ExitStack() as stack:
        try:
            dsn = stack.enter_context(pg.server())
        except pg.NoServer as exc:
            pytest.skip(str(exc))
        yield dsn


@pytest.fixture
def postgres_dsn(postgres_server):
    """A DSN whose journal tables live in a schema of this test's own."""
    from tests import postgres_server as pg

    with pg.fresh_schema(postgres_server) as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgres"])
def journal_at(request, tmp_path):
    """Where a test's journal lives: an SQLite path (one file per name), then a
    PostgreSQL DSN (one schema per test, whatever the name)."""
    if request.param == "sqlite":
        return lambda name="j": str(tmp_path / f"{name}.db")
    dsn = request.getfixturevalue("postgres_dsn")
    return lambda name="j": dsn


@pytest.fixture(autouse=True, scope="session")
def metrics_servers_take_any_free_port():
    """Metrics and dashboard servers started without a port take any free one (and so do
    the commands the tests start): suites running side by side never share a port."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYDOTCOMPUTE_METRICS_PORT", "0")
        mp.setenv("PYDOTCOMPUTE_DASHBOARD_PORT", "0")
        yield
