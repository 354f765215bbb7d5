"""Messages: ``@message`` classes, their msgpack codec and their fixed-size record layouts."""

from pydotcompute.messages.codec import decode, deserialize_message, encode
from pydotcompute.messages.message import RingKernelMessage, message
from pydotcompute.messages.record import (
    has_record_layout,
    messages_from_records,
    record_dtype_of,
    records_from_messages,
)
from pydotcompute.messages.registry import get_message_type, message_type

__all__ = [
    "RingKernelMessage",
    "message",
    "encode",
    "decode",
    "deserialize_message",
    "message_type",
    "get_message_type",
    "record_dtype_of",
    "has_record_layout",
    "records_from_messages",
    "messages_from_records",
]
