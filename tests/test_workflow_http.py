"""Task completion over real HTTP on loopback, through the example approval page."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import pathlib
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from pydotcompute import RingKernelRuntime

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "approval_server", ROOT / "examples" / "approval_server.py"
)
assert _spec is not None and _spec.loader is not None
app = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(app)


def fetch(url: str, data: bytes | None = None, accept: str = "application/json") -> Any:
    req = urllib.request.Request(url, data=data, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def test_claims_are_approved_and_rejected_over_http(tmp_path: pathlib.Path) -> None:
    async with RingKernelRuntime(journal=tmp_path / "claims.db") as rt:
        for claim in app.CLAIMS:
            await rt.start_workflow(app.expense, claim, key=claim["id"])
        with app.ApprovalServer(rt) as server:
            assert server.url.startswith("http://127.0.0.1:")
            while len(rt.pending_tasks(app.approval)) < 2:
                await asyncio.sleep(0.01)
            status, body = await asyncio.to_thread(fetch, server.url + "/pending")
            assert status == 200
            assert sorted(p["key"] for p in json.loads(body)) == ["c2/1", "c3/1"]
            status, body = await asyncio.to_thread(fetch, server.url + "/", None, "text/html")
            assert status == 200 and "grace" in body and "950.00" in body

            def form(**fields: str) -> bytes:
                return urllib.parse.urlencode(fields).encode()

            url = server.url + "/complete"
            # refused answers leave the claim pending
            status, body = await asyncio.to_thread(fetch, url, form(key="c2/1", decision="ok"))
            assert status == 400 and "decision" in json.loads(body)["error"]
            status, _ = await asyncio.to_thread(
                fetch, url, form(key="zz/1", decision="approve", by="x")
            )
            assert status == 404
            status, _ = await asyncio.to_thread(fetch, url, b"k=" + b"x" * 5000)
            assert status == 413
            assert len(rt.pending_tasks(app.approval)) == 2
            # a JSON client, then the HTML form (303 back to the page)
            status, body = await asyncio.to_thread(
                fetch, url, form(key="c2/1", decision="approve", by="ann")
            )
            assert (status, json.loads(body)) == (200, {"completed": "c2/1"})
            status, body = await asyncio.to_thread(
                fetch, url, form(key="c3/1", decision="reject", by="ann"), "text/html"
            )
            assert status == 200 and "Nothing waits for you" in body
            status, _ = await asyncio.to_thread(
                fetch, url, form(key="c3/1", decision="approve", by="ann")
            )
            assert status == 404  # answered already
        results = [await rt.workflow_result(c["id"], timeout=5) for c in app.CLAIMS]
    assert results == [
        "paid 42.00 to ada",
        "paid 950.00 to grace",
        "claim c3 rejected by ann",
    ]


async def test_server_listens_on_loopback_only(tmp_path: pathlib.Path) -> None:
    async with RingKernelRuntime(journal=tmp_path / "claims.db") as rt:
        with app.ApprovalServer(rt) as server:
            assert server.httpd.server_address[0] == "127.0.0.1"
            status, body = await asyncio.to_thread(fetch, server.url + "/nothing")
            assert status == 404


def test_page_escapes_what_people_typed() -> None:
    html = app.page([{"key": "k'1", "claim": {"who": "<b>eve</b>", "amount": 1.0}}])
    assert "<b>eve" not in html and "&lt;b&gt;eve" in html and "k&#x27;1" in html
    with pytest.raises(ValueError):
        app.approval.accept({}, {"decision": "approve"})
