"""Every decoder a peer can reach gets arbitrary bytes and mutated valid frames: message
bytes, record batches, journal rows read back, and the approval example's HTTP body.
Each answers with a value it can stand behind or a typed error; never another exception,
a hang, or a wrong value taken for a right one.

The suite keeps hypothesis's budget small; ``PYDOTCOMPUTE_FUZZ_EXAMPLES=20000`` runs each
property that many times.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pathlib
import pickle
import socket
import sqlite3
import uuid
from datetime import date, datetime
from typing import Annotated, Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydotcompute import RingKernelRuntime
from pydotcompute.coordinator import deploy, stage
from pydotcompute.coordinator.records import decode as decode_row
from pydotcompute.coordinator.records import encode as encode_row
from pydotcompute.errors import ItemFailedError, JournalError, MessageDeserializationError
from pydotcompute.messages import (
    decode,
    encode,
    message,
    messages_from_records,
    records_from_messages,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("PYDOTCOMPUTE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=2000,  # ms per example: a decoder that hangs fails here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 150,  # the suite's short run is the same on every machine
)


def mutate(frame: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    """``frame`` with bytes overwritten at ``edits`` and, one time in three, cut short."""
    b = bytearray(frame)
    for pos, value in edits:
        b[pos % len(b)] = value
    if cut % 3 == 0:
        del b[len(b) - cut % len(b) :]
    return bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=6)


# ---- messages ----------------------------------------------------------------------


@message
class Inner:
    a: int = 0


@message
class Frame:
    x: float = 0.0
    tag: str = ""
    when: Any = None
    arr: Any = None
    inner: Any = None
    items: Any = None


FRAMES = [
    encode(
        Frame(
            x=1.5,
            tag="hi",
            when=datetime(2020, 1, 2, 3, 4, 5),
            arr=np.arange(6, dtype=np.int32).reshape(2, 3),
            inner=Inner(a=4),
            items=(1, "b", uuid.uuid4(), date(2021, 5, 6), np.float32(2.5)),
        ),
    ),
    encode(Inner(a=7, correlation_id=uuid.uuid4(), priority=3)),
    encode(Frame(arr=np.zeros((2,), dtype=[("a", "<i4"), ("b", "<f8")]))),
]


def decoded_or_refused(data: bytes, expected: type | None = None) -> None:
    try:
        msg = decode(data, expected)
    except MessageDeserializationError:
        return
    # What is accepted is a well-formed message: the header as a constructor makes it.
    assert type(msg.message_id) is uuid.UUID
    assert msg.correlation_id is None or type(msg.correlation_id) is uuid.UUID
    assert type(msg.priority) is int and 0 <= msg.priority <= 255
    assert expected is None or isinstance(msg, expected)


@FUZZ
@given(st.binary(max_size=400))
def test_message_decode_of_arbitrary_bytes(data):
    decoded_or_refused(data)
    decoded_or_refused(data, Frame)


@FUZZ
@given(st.sampled_from(FRAMES), EDITS, st.integers(0, 500))
def test_message_decode_of_mutated_frames(frame, edits, cut):
    data = mutate(frame, edits, cut)
    decoded_or_refused(data)
    decoded_or_refused(data, Inner)


def test_a_frame_whose_ids_are_not_uuids_is_refused():
    # Found by the fuzzing above: header fields took any type the bytes named.
    good = encode(Inner(a=1, correlation_id=uuid.UUID(int=5)))
    bad = good.replace(b"\xd8\x02" + uuid.UUID(int=5).bytes, b"\x05")  # an int instead
    assert bad != good
    with pytest.raises(MessageDeserializationError, match="correlation_id must be a UUID"):
        decode(bad)
    bad_id = encode(Inner(a=1)).replace(b"message_id\xd8\x02", b"message_id\xc4\x10")
    with pytest.raises(MessageDeserializationError, match="message_id must be a UUID"):
        decode(bad_id)


# ---- record batches ------------------------------------------------------------------


@message
class Reading:
    a: int
    b: float
    c: bool
    d: uuid.UUID
    e: np.float32
    f: np.int16
    g: Annotated[np.ndarray, (3,), np.float32]
    h: np.complex64
    i: np.float16


DTYPE = Reading.__record_dtype__


def same(x: Any, y: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.tobytes() == y.tobytes() or bool(np.array_equal(x, y, equal_nan=True))
    if isinstance(x, (float, np.floating, np.complexfloating)) and np.isnan(x):
        return bool(np.isnan(y))
    return bool(x == y)


@FUZZ
@given(st.binary(min_size=DTYPE.itemsize, max_size=4 * DTYPE.itemsize))
def test_record_batches_of_arbitrary_bytes_decode_to_stable_values(data):
    # Every bit pattern of a record is a value of its fields' types (a nonzero bool byte
    # is True, an all-zero correlation id is None): records decode whole, and what they
    # decode to stores and reads back as itself.
    records = np.frombuffer(data[: len(data) // DTYPE.itemsize * DTYPE.itemsize], DTYPE)
    msgs = messages_from_records(Reading, records)
    again = messages_from_records(Reading, records_from_messages(msgs, Reading))
    for m, n in zip(msgs, again, strict=True):
        assert type(m.message_id) is uuid.UUID and 0 <= m.priority <= 255
        for f in ("a", "b", "c", "d", "e", "f", "g", "h", "i", "message_id", "correlation_id"):
            assert same(getattr(m, f), getattr(n, f)), f


# ---- journal rows --------------------------------------------------------------------

VALUES = st.recursive(
    st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=10), st.binary(max_size=10)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner)
    ),
    max_leaves=10,
)


@FUZZ
@given(st.binary(max_size=200))
def test_journal_rows_of_arbitrary_bytes_are_refused(data):
    try:
        decode_row(data)
    except JournalError:
        return
    # Only a bare protocol-5 pickle (a row from before rows had checksums) is read as is.
    assert data[:2] == b"\x80\x05"


@FUZZ
@given(VALUES, EDITS, st.integers(0, 500))
def test_mutated_journal_rows_come_back_right_or_are_refused(value, edits, cut):
    frame = encode_row(value)
    data = mutate(frame, edits, cut)
    try:
        back = decode_row(data)
    except JournalError:
        return
    # Accepted only unchanged, and then as the very value (NaN included) that was stored.
    assert data == frame and pickle.dumps(back) == pickle.dumps(value), (value, back)


async def test_a_damaged_item_row_fails_that_item_and_no_other(tmp_path):
    path = tmp_path / "j.db"
    gate = asyncio.Event()

    async def held(x: int) -> int:
        await gate.wait()
        return x

    flow = await deploy(None, stage(abs) >> held, name="d", journal=path)
    await flow.submit_many([-1, -2, -3], keys=["a", "b", "c"])
    await asyncio.sleep(0.3)
    await flow.cancel("stop", timeout=1)  # all three wait at `held`, in the journal
    with sqlite3.connect(path) as conn:  # damage one stored input, byte by byte
        (blob,) = conn.execute("SELECT value FROM tokens WHERE key='b'").fetchone()
        conn.execute(
            "UPDATE tokens SET value=? WHERE key='b'",
            (blob[:-2] + bytes([blob[-2] ^ 1]) + blob[-1:],),
        )
    gate.set()
    async with await deploy(None, stage(abs) >> held, name="d", journal=path) as flow:
        await flow.drain(timeout=10)
        assert flow.status() == {"done": 2, "dead": 1}
        assert await flow.result("a") == 1 and await flow.result("c") == 3
        with pytest.raises(ItemFailedError, match="cannot be read back") as err:
            await flow.result("b")
        assert err.value.record.stage == "held" and isinstance(err.value.record.value, bytes)
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE results SET value=x'0102' WHERE key='a'")
        with pytest.raises(JournalError, match="damaged"):
            await flow.result("a")


# ---- the approval example's HTTP body ----------------------------------------------

_spec = importlib.util.spec_from_file_location(
    "approval_server", ROOT / "examples" / "approval_server.py"
)
assert _spec is not None and _spec.loader is not None
app = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(app)


@FUZZ
@given(st.one_of(st.none(), st.text(max_size=12)), st.binary(max_size=300))
def test_approval_body_parsing_answers_or_refuses(header, body):
    try:
        length = app.body_length(header)
        key, answer = app.parse_completion(body[:length], length)
    except app.BadRequest as exc:  # the documented refusal: a 4xx status with a reason
        assert exc.status in (400, 413) and str(exc)
        return
    assert 0 <= length <= app.MAX_BODY
    assert isinstance(key, str) and set(answer) == {"decision", "by"}
    assert all(isinstance(v, str) for v in answer.values())


@FUZZ
@given(
    st.sampled_from([b"key=c2%2F1&decision=approve&by=ada", b"key=x&by=y"]),
    EDITS,
    st.integers(0, 99),
)
def test_approval_body_parsing_of_mutated_forms(form, edits, cut):
    body = mutate(form, edits, cut)
    try:
        key, answer = app.parse_completion(body, len(body))
    except app.BadRequest:
        return
    assert isinstance(key, str) and isinstance(answer["decision"], str)


def raw_request(addr: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_the_approval_server_answers_bad_bodies_and_stays_up(tmp_path):
    async with RingKernelRuntime(journal=tmp_path / "claims.db") as rt:
        with app.ApprovalServer(rt) as server:
            addr = server.httpd.server_address[:2]

            def post(headers: str, body: bytes) -> bytes:
                head = f"POST /complete HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
                return raw_request(addr, head + body)

            cases = {
                "Content-Length: abc\r\n": b"key=a",  # was: ValueError, no answer
                "Content-Length: -5\r\n": b"key=a",  # was: read to EOF
                "Content-Length: 4\r\n": b"\xff\xfe\xfd\xfc",  # was: UnicodeDecodeError
                "Content-Length: 20\r\n": b"key=a",  # the client stopped early
                "Content-Length: 9999\r\n": b"",
                "Content-Length: 7\r\n": b"%%%&&&=",
            }
            for headers, body in cases.items():
                reply = await asyncio.to_thread(post, headers, body)
                status = int(reply.split(b" ", 2)[1])
                assert 400 <= status < 500, (headers, reply[:200])
            reply = await asyncio.to_thread(raw_request, addr, b"GET /pending HTTP/1.1\r\n\r\n")
            assert reply.startswith(b"HTTP/1.0 200")
