"""An approval page for durable workflows, on the standard library's HTTP server.

Expense claims run as workflows; a claim over 100 waits for a person (a ``@task``).
The page lists the waiting claims and approves or rejects them; the workflows go on
from there. Stop the program at any time: the claims, waiting or not, are in the
journal, and the next run resumes them.

    python examples/approval_server.py [journal.db] [port]   # then open the printed address

Ctrl-C stops it: the runtime shuts down cleanly and the waiting claims stay in the journal.

The server listens on 127.0.0.1 only, answers one request at a time, reads at most
4 KiB per request and gives up on a client after 5 seconds.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from pydotcompute import RingKernelRuntime
from pydotcompute.workflows import activity, task, workflow

QUICK = os.environ.get("PYDOTCOMPUTE_EXAMPLE_QUICK") == "1"
MAX_BODY = 4096


@activity(retries=3)
async def check(claim: dict) -> dict:
    if claim["amount"] <= 0:
        raise ValueError(f"claim {claim['id']}: the amount must be positive")
    return {**claim, "needs_approval": claim["amount"] > 100}


@task
def approval(claim: dict, answer: dict) -> str:
    """The person's answer, checked: {"decision": "approve"|"reject", "by": name}."""
    if answer.get("decision") not in ("approve", "reject") or not answer.get("by"):
        raise ValueError("an answer is a decision (approve or reject) and who gave it")
    verdict = {"approve": "approved", "reject": "rejected"}[answer["decision"]]
    return f"{verdict} by {answer['by']}"


@activity
async def pay(claim: dict) -> str:
    return f"paid {claim['amount']:.2f} to {claim['who']}"


@workflow(name="expense")
async def expense(claim: dict, ctx: Any) -> str:
    claim = await ctx.call(check, claim)
    if claim["needs_approval"]:
        verdict = await ctx.call(approval, claim)
        if verdict.startswith("rejected"):
            return f"claim {claim['id']} {verdict}"
    return await ctx.call(pay, claim)


class ApprovalServer:
    """The page, served from a thread; every journal access hops onto the event loop."""

    def __init__(self, rt: RingKernelRuntime, port: int = 0) -> None:
        self.rt = rt
        self.loop = asyncio.get_running_loop()
        self.httpd = HTTPServer(("127.0.0.1", port), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ApprovalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()  # waits for the request being served
        self.httpd.server_close()
        self._thread.join()

    def _on_loop(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _pending(self) -> list[dict]:
        return [
            {"key": p.key, "workflow": p.workflow, "claim": p.request}
            for p in self.rt.pending_tasks(approval)
        ]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # seconds a slow client may hold the only thread

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # keep the console for the workflows

            def _send(self, status: int, body: str, kind: str = "application/json") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", f"{kind}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                pending = server._on_loop(server._pending())
                if self.path == "/pending":
                    self._send(200, json.dumps(pending))
                elif self.path == "/":
                    self._send(200, page(pending), "text/html")
                else:
                    self._send(404, json.dumps({"error": "not found"}))

            def do_POST(self) -> None:  # noqa: N802
                if self.path != "/complete":
                    self._send(404, json.dumps({"error": "not found"}))
                    return
                try:
                    length = body_length(self.headers.get("Content-Length"))
                    key, answer = parse_completion(self.rfile.read(length), length)
                except BadRequest as exc:
                    self._send(exc.status, json.dumps({"error": str(exc)}))
                    return
                except TimeoutError:
                    self._send(408, json.dumps({"error": "the body did not arrive in time"}))
                    return
                try:
                    done = server._on_loop(server.rt.complete_task(approval, key, answer))
                except ValueError as exc:
                    self._send(400, json.dumps({"error": str(exc)}))
                    return
                except Exception as exc:  # the journal or the loop failed: say so, stay up
                    self._send(503, json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
                    return
                if not done:
                    self._send(404, json.dumps({"error": f"no pending claim {key!r}"}))
                elif "text/html" in (self.headers.get("Accept") or ""):
                    self.send_response(303)
                    self.send_header("Location", "/")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send(200, json.dumps({"completed": key}))

        return Handler


class BadRequest(ValueError):
    """A request the page refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def body_length(header: str | None) -> int:
    """The Content-Length a POST announced: 0 to MAX_BODY, else BadRequest."""
    text = (header or "0").strip()
    if not text.isascii() or not text.isdigit():
        raise BadRequest(400, f"Content-Length must be a number of bytes, got {text[:20]!r}")
    if int(text) > MAX_BODY:
        raise BadRequest(413, f"at most {MAX_BODY} bytes")
    return int(text)


def parse_completion(body: bytes, length: int) -> tuple[str, dict]:
    """(key, answer) from a form body ``key=..&decision=..&by=..``; BadRequest if the
    body is short, not UTF-8, or not such a form."""
    if len(body) != length:
        raise BadRequest(400, f"the body has {len(body)} of the {length} bytes announced")
    try:
        text = body.decode("utf-8")
        form = urllib.parse.parse_qs(text, max_num_fields=10, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(400, f"the body is not a UTF-8 form: {exc}") from None
    fields = {name: values[0] for name, values in form.items() if len(values) == 1}
    if "key" not in fields or any(len(v) > 1 for v in form.values()):
        raise BadRequest(400, "the form needs one key field (and one decision and by)")
    return fields["key"], {"decision": fields.get("decision", ""), "by": fields.get("by", "")}


def page(pending: list[dict]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(p['claim']['who'])}</td><td>{p['claim']['amount']:.2f}</td>"
        f"<td><form method=post action=/complete>"
        f"<input type=hidden name=key value='{html.escape(p['key'], quote=True)}'>"
        "<input name=by placeholder='your name' required>"
        "<button name=decision value=approve>approve</button>"
        "<button name=decision value=reject>reject</button></form></td></tr>"
        for p in pending
    )
    return (
        "<!doctype html><title>Claims to approve</title><h1>Claims to approve</h1>"
        f"<table><tr><th>who</th><th>amount</th><th></th></tr>{rows}</table>"
        if pending
        else "<!doctype html><title>Claims to approve</title><p>Nothing waits for you.</p>"
    )


def post(url: str, **fields: str) -> dict:
    body = urllib.parse.urlencode(fields).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5) as r:
        return json.loads(r.read())


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


CLAIMS = [
    {"id": "c1", "who": "ada", "amount": 42.0},
    {"id": "c2", "who": "grace", "amount": 950.0},
    {"id": "c3", "who": "alan", "amount": 180.0},
]


async def main(path: str, port: int = 8765) -> None:
    async with RingKernelRuntime(journal=path) as rt:
        for claim in CLAIMS:  # known keys are not started twice
            await rt.start_workflow(expense, claim, key=claim["id"])
        print("resumed:", await rt.resume_workflows(expense))
        with ApprovalServer(rt, port=0 if QUICK else port) as server:
            if not QUICK:
                print(f"approve claims at {server.url} (Ctrl-C to stop)", flush=True)
                await asyncio.Event().wait()
            # The short run plays the approver through the page's JSON side.
            while len(await asyncio.to_thread(get, server.url + "/pending")) < 2:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(
                post, server.url + "/complete", key="c2/1", decision="approve", by="linus"
            )
            await asyncio.to_thread(
                post, server.url + "/complete", key="c3/1", decision="reject", by="linus"
            )
        for claim in CLAIMS:
            print(claim["id"], "->", await rt.workflow_result(claim["id"], timeout=10))


def run(path: str) -> None:
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 8765
    try:
        asyncio.run(main(path, port))
    except KeyboardInterrupt:
        # asyncio.run cancelled main(): the server and the runtime closed on the way out.
        print("\nstopped; waiting claims stay in the journal", path)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(os.path.join(tmp, "claims.db"))
