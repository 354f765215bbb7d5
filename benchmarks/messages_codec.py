"""Message codec speed: encode/decode and record conversion per message.

Baselines measured in the same run: ``msgpack.packb(dataclasses.asdict(m))`` /
``msgpack.unpackb`` + ``Cls(**fields)`` for the codec, and ``np.array(list_of_tuples,
dtype)`` for records. Prints microseconds per message and the ratio to the baseline.

    python benchmarks/messages_codec.py
"""

from __future__ import annotations

import dataclasses
import timeit
import uuid

import msgpack
import numpy as np

from pydotcompute.messages import (
    decode,
    encode,
    message,
    messages_from_records,
    record_dtype_of,
    records_from_messages,
)


@message
class Reading:
    sensor: int
    value: float
    ok: bool = True


def _uuid_hook(obj: object) -> object:
    if isinstance(obj, uuid.UUID):
        return obj.bytes
    raise TypeError(type(obj).__name__)


def _per_call_us(fn, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e6


def main() -> None:
    m = Reading(7, 21.5, correlation_id=uuid.uuid4())
    data = encode(m)
    baseline_data = msgpack.packb(dataclasses.asdict(m), default=_uuid_hook)

    def baseline_decode() -> Reading:
        fields = msgpack.unpackb(baseline_data)
        fields["message_id"] = uuid.UUID(bytes=fields["message_id"])
        fields["correlation_id"] = uuid.UUID(bytes=fields["correlation_id"])
        return Reading(**fields)

    n = 20_000
    enc = _per_call_us(lambda: encode(m), n)
    enc_base = _per_call_us(lambda: msgpack.packb(dataclasses.asdict(m), default=_uuid_hook), n)
    dec = _per_call_us(lambda: decode(data), n)
    dec_base = _per_call_us(baseline_decode, n)
    print(f"codec, one small message ({len(data)} bytes)")
    print(
        f"  encode   {enc:7.2f} us   baseline packb(asdict) {enc_base:7.2f} us   ratio {enc_base / enc:5.2f}x"
    )
    print(
        f"  decode   {dec:7.2f} us   baseline unpackb+init  {dec_base:7.2f} us   ratio {dec_base / dec:5.2f}x"
    )

    batch = [Reading(i, i * 0.5, correlation_id=uuid.uuid4()) for i in range(10_000)]
    dtype = record_dtype_of(Reading)

    def baseline_records() -> np.ndarray:
        rows = [
            (
                np.frombuffer(r.message_id.bytes, np.uint8),
                r.priority,
                np.frombuffer(r.correlation_id.bytes, np.uint8),
                r.sensor,
                r.value,
                r.ok,
            )
            for r in batch
        ]
        return np.array(rows, dtype)

    recs = records_from_messages(batch)
    assert (recs == baseline_records()).all()
    to_rec = _per_call_us(lambda: records_from_messages(batch), 3) / len(batch)
    to_rec_base = _per_call_us(baseline_records, 3) / len(batch)
    from_rec = _per_call_us(lambda: messages_from_records(Reading, recs), 3) / len(batch)
    print(f"records, batch of {len(batch)} ({dtype.itemsize}-byte records)")
    print(
        f"  records_from_messages {to_rec:6.3f} us/msg ({1 / to_rec:5.2f} M msg/s)   "
        f"baseline np.array(tuples) {to_rec_base:6.3f} us/msg   ratio {to_rec_base / to_rec:5.2f}x"
    )
    print(f"  messages_from_records {from_rec:6.3f} us/msg ({1 / from_rec:5.2f} M msg/s)")
    one = _per_call_us(lambda: m.to_record(), n)
    back = m.to_record()
    one_back = _per_call_us(lambda: Reading.from_record(back), n)
    print(f"  to_record {one:6.2f} us   from_record {one_back:6.2f} us (one message)")


if __name__ == "__main__":
    main()
