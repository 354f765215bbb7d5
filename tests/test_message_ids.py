"""Message ids: ``new_id`` makes what ``uuid.uuid4`` makes, and ``@message`` uses it."""

from __future__ import annotations

import os
import pickle
import threading
import uuid
from dataclasses import dataclass, field

import pytest

from pydotcompute.messages import RingKernelMessage, message
from pydotcompute.messages.ids import new_id


def test_an_id_is_a_random_version_4_uuid_like_uuid4_makes():
    ids = [new_id() for _ in range(2000)]
    assert all(type(u) is uuid.UUID for u in ids)
    assert {u.version for u in ids} == {4} and {u.variant for u in ids} == {uuid.RFC_4122}
    for u in ids[:50]:
        same = uuid.UUID(str(u))
        assert u == same and hash(u) == hash(same) and u.bytes == same.bytes
        assert pickle.loads(pickle.dumps(u)) == u
        assert u.is_safe is uuid.SafeUUID.unknown
    assert len(set(ids)) == len(ids)
    # Every one of the 122 random bits varies (the 6 fixed ones do not).
    varying = 0
    for bit in range(128):
        if len({(u.int >> bit) & 1 for u in ids}) == 2:
            varying += 1
    assert varying == 122


def test_threads_never_get_the_same_id():
    per_thread: list[list[uuid.UUID]] = [[] for _ in range(4)]

    def make(out: list[uuid.UUID]) -> None:
        for _ in range(5000):  # many refills of 256 ids, racing each other
            out.append(new_id())

    threads = [threading.Thread(target=make, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [u for out in per_thread for u in out]
    assert len(set(every)) == len(every) == 20000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_repeat_its_parents_ids():
    new_id()  # the parent holds a batch of random bytes it has not used yet
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next ids and leave at once
        try:
            os.write(write_end, b"".join(new_id().bytes for _ in range(16)))
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    while len(data) < 16 * 16:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    childs = {uuid.UUID(bytes=data[i : i + 16]) for i in range(0, len(data), 16)}
    parents = {new_id() for _ in range(16)}
    assert len(childs) == 16 and not childs & parents


@message
@dataclass
class AsDocumented:
    value: str
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)
    priority: int = 128
    correlation_id: uuid.UUID | None = None


def _own_ids() -> uuid.UUID:
    return uuid.UUID(int=7)


@message
@dataclass
class OwnFactory:
    value: str
    message_id: uuid.UUID = field(default_factory=_own_ids)


class Subclassed(RingKernelMessage):
    value: str
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)


@message
class Plain:
    value: str


@pytest.mark.parametrize("cls", [AsDocumented, Subclassed, Plain])
def test_messages_asking_for_uuid4_get_new_id(cls: type) -> None:
    assert cls.__dataclass_fields__["message_id"].default_factory is new_id
    a, b = cls(value="x"), cls(value="x")
    assert a.message_id != b.message_id and a.message_id.version == 4


def test_a_message_with_its_own_id_factory_keeps_it():
    assert OwnFactory(value="x").message_id == uuid.UUID(int=7)
