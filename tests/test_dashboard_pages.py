"""The dashboard in headless Chromium: history kept by the server, the charts, the
drill-down pages, and actions (retry, answer) with their refusals."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from browser import CHROMIUM, Browser

from pydotcompute import RingKernelRuntime
from pydotcompute.cli.dashboard_views import JournalViews
from pydotcompute.coordinator import stage
from pydotcompute.telemetry.server import serve_dashboard_proxy, serve_metrics
from pydotcompute.telemetry.snapshot import KernelTelemetry
from pydotcompute.workflows import task, workflow

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install -y chromium)",
)


class Busy:
    """A kernel at about 1000 messages/s with a latency histogram, and a flow."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def get_all_telemetry(self) -> dict[str, KernelTelemetry]:
        n = int((time.monotonic() - self.start) * 1000)
        buckets = [0] * 26
        buckets[3] = n  # 4-8 µs
        return {
            "echo": KernelTelemetry(
                "echo",
                "host",
                "active",
                messages_processed=n,
                queue_depth=3,
                queue_capacity=8,
                latency_buckets=tuple(buckets),
                latency_sum_s=n * 12e-6,
            )
        }

    def get_flow_telemetry(self) -> dict[str, dict[str, int]]:
        n = int((time.monotonic() - self.start) * 100)
        return {
            "etl": {
                "submitted": n,
                "completed": n,
                "retried": n // 10,
                "dead_lettered": n // 50,
                "in_flight": 2,
            }
        }


def get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> Any:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_history_is_kept_by_the_server_and_every_viewer_sees_it() -> None:
    with serve_metrics(Busy(), gpu=False, history_interval=0.05) as server:
        time.sleep(1.0)  # history piles up before anyone looks
        status, before = get(server.dashboard_url + "api/history")
        assert status == 200 and len(before["samples"]) >= 10
        with Browser() as page:
            points = "Number(document.getElementById('throughput').dataset.points)"
            page.open(server.dashboard_url + "?interval=200")
            page.wait_for(f"{points} >= 10")
            # At once, the page has the samples taken before it was opened.
            assert page.eval(points) >= len(before["samples"]) - 2
            first = page.eval(points)
            page.open(server.dashboard_url + "?interval=200")  # a reload loses nothing
            page.wait_for(f"{points} >= {first}")
            rates = json.loads(page.eval("document.getElementById('throughput').dataset.lastRates"))
            assert 500 < rates["echo"] < 2000
        status, later = get(
            server.dashboard_url + f"api/history?since={before['samples'][-1]['t']}"
        )
        assert all(s["t"] > before["samples"][-1]["t"] for s in later["samples"])


def test_overview_charts_latency_fill_flows_and_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_telemetry_gpu import DEVICES, fake_nvml

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(DEVICES))
    with serve_metrics(Busy(), history_interval=0.05) as server:
        time.sleep(0.5)
        with Browser() as page:
            page.open(server.dashboard_url + "?interval=200")
            for chart in (
                "latency",
                "fill",
                "flow-items",
                "flow-retries",
                "flow-dead",
                "gpu-util",
                "gpu-memory",
            ):
                page.wait_for(
                    f"(document.getElementById({chart!r}) || {{dataset: {{}}}}).dataset.points > 2"
                )
            last = lambda c: json.loads(  # noqa: E731
                page.eval(f"document.getElementById({c!r}).dataset.lastRates")
            )
            assert 4e-6 <= last("latency")["echo p50"] <= 8.2e-6
            assert last("fill")["echo"] == pytest.approx(3 / 8)
            assert 50 < last("flow-items")["etl"] < 200
            assert last("gpu-util")["GPU 0"] == pytest.approx(0.37)
            # Readable on a laptop: nothing wider than the screen.
            assert page.eval("document.documentElement.scrollWidth") <= 1366


# ---- a runtime with a journal: kernels, flows, workflows --------------------------------


async def crash(ctx: Any) -> None:
    while not ctx.should_terminate:
        msg = await ctx.receive()
        raise RuntimeError(f"cannot handle {msg!r}")


def parse(text: str) -> int:
    if text.startswith("bad"):
        raise ValueError(f"cannot parse {text!r}")
    return int(text)


approval = task("approval")


@workflow(name="claim")
async def claim(request: dict, ctx: Any) -> str:
    verdict = await ctx.call(approval, request)
    return f"{request['id']}: {verdict}"


async def runtime_with_work(rt: RingKernelRuntime) -> Any:
    for _ in range(2):  # it fails, is launched again (a restart) and fails again
        await rt.launch("crash", crash)
        await rt.activate("crash")
        await rt.send("crash", "poison")
        while rt.get_kernel_state("crash").name != "FAILED":
            await asyncio.sleep(0.01)
    flow = await rt.deploy(stage(parse, retries=1), name="etl")
    await flow.submit_many(["1", "2", "bad"], keys=["a", "b", "c"])
    await flow.drain(timeout=30)
    await rt.start_workflow(claim, {"id": "k1"}, key="k1")
    while not rt.pending_tasks(approval):
        await asyncio.sleep(0.01)
    return flow


async def test_kernel_page_shows_config_error_traceback_and_restarts(tmp_path: Any) -> None:
    async with RingKernelRuntime(journal=str(tmp_path / "j.db")) as rt:
        await runtime_with_work(rt)
        url = rt.serve_dashboard(port=0)

        def look() -> dict[str, Any]:
            with Browser() as page:
                page.open(url + "#/kernel/crash")
                page.wait_for("document.getElementById('kernel-detail').dataset.loaded === '1'")
                return page.eval(
                    """({error: document.getElementById('kernel-error').textContent,
                        traceback: document.getElementById('kernel-traceback').textContent,
                        restarts: document.getElementById('kernel-detail').dataset.restarts,
                        text: document.getElementById('kernel-detail').textContent})"""
                )

        seen = await asyncio.to_thread(look)
    assert "RuntimeError: cannot handle 'poison'" in seen["error"]
    assert "Traceback (most recent call last)" in seen["traceback"]
    assert "raise RuntimeError" in seen["traceback"]
    assert seen["restarts"] == "1"
    assert "queue_size" in seen["text"] and "crash" in seen["text"]


async def test_flow_page_retries_a_dead_letter_only_with_actions_and_token(tmp_path: Any) -> None:
    async with RingKernelRuntime(journal=str(tmp_path / "j.db")) as rt:
        flow = await runtime_with_work(rt)
        url = rt.serve_dashboard(port=0, actions=True)
        base = url.rstrip("/")

        def refusals() -> list[tuple[int, str]]:
            body = json.dumps({"flow": "etl", "key": "c"}).encode()
            out = []
            # no token
            out.append(get(base + "/api/action/retry", {"Content-Type": "application/json"}, body))
            # a wrong token
            out.append(get(base + "/api/action/retry", {"X-PyDotCompute-Token": "guess"}, body))
            # the right token, but asked for by another site's name (DNS rebinding)
            token = get(base + "/api/info")[1]["token"]
            out.append(
                get(
                    base + "/api/action/retry",
                    {"X-PyDotCompute-Token": token, "Host": "evil.example:80"},
                    body,
                )
            )
            out.append(get(base + "/api/info", {"Host": "evil.example"}))
            return [(s, b["error"]) for s, b in out]

        refused = await asyncio.to_thread(refusals)
        assert [s for s, _ in refused] == [403, 403, 403, 403]
        assert "token" in refused[0][1] and "loopback" in refused[2][1]
        assert flow.status() == {"done": 2, "dead": 1}  # nothing changed

        def click_retry() -> tuple[str, Any]:
            with Browser() as page:
                page.open(url + "#/flow/etl")
                page.wait_for("document.querySelector('button[data-retry=\"c\"]')")
                stages = page.eval(
                    "Array.from(document.querySelectorAll('tr[data-stage]')).map(r => r.dataset.stage)"
                )
                page.eval("document.querySelector('button[data-retry=\"c\"]').click()")
                message = page.wait_for(
                    "document.getElementById('message').dataset.status === 'ok' && "
                    "!/…$/.test(document.getElementById('message').textContent) && "
                    "document.getElementById('message').textContent"
                )
                return message, stages

        message, stages = await asyncio.to_thread(click_retry)
        assert "ok c" in message and stages == ["parse"]
        await flow.drain(timeout=30)
        # It went through flow.retry: parse ran again (and failed again, as it must).
        assert flow.counters()["dead_lettered"] == 2
        assert flow.status() == {"done": 2, "dead": 1}


async def test_without_actions_there_is_no_button_and_posts_are_refused(tmp_path: Any) -> None:
    async with RingKernelRuntime(journal=str(tmp_path / "j.db")) as rt:
        flow = await runtime_with_work(rt)
        url = rt.serve_dashboard(port=0)  # actions off: the default

        def look() -> tuple[Any, Any, Any]:
            with Browser() as page:
                page.open(url + "#/flow/etl")
                page.wait_for("document.getElementById('flow-detail').dataset.loaded === '1'")
                buttons = page.eval("document.querySelectorAll('button[data-retry]').length")
                note = page.eval("document.querySelector('.actions-off').textContent")
                posted = page.eval(
                    "fetch('api/action/retry', {method: 'POST', headers: "
                    "{'Content-Type': 'application/json'}, body: JSON.stringify("
                    "{flow: 'etl', key: 'c'})}).then(r => r.status)"
                )
                return buttons, note, posted

        buttons, note, posted = await asyncio.to_thread(look)
        assert buttons == 0 and "Actions are off" in note and posted == 403
        assert flow.counters()["dead_lettered"] == 1


async def test_tasks_page_answers_and_the_workflow_goes_on(tmp_path: Any) -> None:
    async with RingKernelRuntime(journal=str(tmp_path / "j.db")) as rt:
        await runtime_with_work(rt)
        url = rt.serve_dashboard(port=0, actions=True)

        def answer() -> tuple[Any, Any, Any]:
            with Browser() as page:
                page.open(url + "#/workflows")
                page.wait_for("document.querySelector('tr[data-workflow-key=\"k1\"]')")
                state = page.eval(
                    "document.querySelector('tr[data-workflow-key=\"k1\"]').dataset.state"
                )
                page.open(url + "#/tasks")
                page.wait_for("document.querySelector('textarea[data-answer-for=\"k1/0\"]')")
                # Not JSON: refused in the page, nothing is sent.
                page.eval(
                    "document.querySelector('textarea[data-answer-for=\"k1/0\"]').value = '{oops';"
                    "document.querySelector('button[data-answer=\"k1/0\"]').click()"
                )
                bad = page.eval("document.getElementById('message').textContent")
                page.eval(
                    "document.querySelector('textarea[data-answer-for=\"k1/0\"]').value = "
                    "'\"approved\"';"
                    "document.querySelector('input[data-as-is-for=\"k1/0\"]').checked = true;"
                    "document.querySelector('button[data-answer=\"k1/0\"]').click()"
                )
                done = page.wait_for(
                    "document.getElementById('message').dataset.status === 'ok' && "
                    "/answered/.test(document.getElementById('message').textContent) && "
                    "document.getElementById('message').textContent"
                )
                return state, bad, done

        state, bad, done = await asyncio.to_thread(answer)
        assert state == "running" and "must be JSON" in bad and "k1/0" in done
        assert await rt.workflow_result("k1", timeout=30) == "k1: approved"

        def workflow_page() -> Any:
            with Browser() as page:
                page.open(url + "#/workflow/k1")
                page.wait_for("document.getElementById('workflow-detail').dataset.loaded === '1'")
                return page.eval(
                    "({state: document.getElementById('workflow-detail').dataset.state,"
                    " steps: document.querySelectorAll('tr[data-pos]').length})"
                )

        seen = await asyncio.to_thread(workflow_page)
        assert seen == {"state": "done", "steps": 1}


async def test_proxy_dashboard_with_a_journal_retries_through_the_journal(tmp_path: Any) -> None:
    path = str(tmp_path / "j.db")
    async with RingKernelRuntime(journal=path) as rt:
        await runtime_with_work(rt)
    # The runtime is gone; a dashboard beside another process' metrics shows its journal.
    with serve_metrics(Busy(), gpu=False) as upstream:
        views = JournalViews(path)
        try:
            with serve_dashboard_proxy(upstream.url, port=0, views=views, actions=True) as proxy:

                def retry() -> tuple[Any, Any]:
                    with Browser() as page:
                        page.open(proxy.dashboard_url + "#/flows")
                        page.wait_for("document.querySelector('tr[data-flow-name=\"etl\"]')")
                        page.open(proxy.dashboard_url + "#/flow/etl")
                        page.wait_for("document.querySelector('button[data-retry=\"c\"]')")
                        page.eval("document.querySelector('button[data-retry=\"c\"]').click()")
                        msg = page.wait_for(
                            "/re-queued/.test(document.getElementById('message').textContent) && "
                            "document.getElementById('message').textContent"
                        )
                        page.open(proxy.dashboard_url + "#/kernel/echo")
                        note = page.wait_for(
                            "document.getElementById('kernel-detail').dataset.loaded === 'none' && "
                            "document.getElementById('kernel-detail').textContent"
                        )
                        return msg, note

                msg, note = await asyncio.to_thread(retry)
        finally:
            views.close()
    assert "ok c: re-queued at parse" in msg
    assert "runtime's own dashboard" in note
    from pydotcompute.coordinator.journal_reader import JournalReader

    with JournalReader(path) as reader:
        [item] = reader.items("etl", keys=["c"])
        assert item.state == "active" and item.tokens[0].stage == "parse"
