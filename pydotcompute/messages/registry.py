"""The message type registry: stable type names to message classes, so bytes decode
without the receiver knowing the type.

The registry holds class definitions, not runtime state: it is filled when message
classes are defined. Defining a class again under a name already taken (a module
reloaded, a cell re-run in a notebook, a class built inside a test function) replaces
the earlier entry.
"""

from __future__ import annotations

import threading

from pydotcompute.errors import AmbiguousMessageTypeError

__all__ = ["register_message_type", "message_type", "message_type_name", "get_message_type"]

_TYPES: dict[str, type] = {}
_LOCK = threading.Lock()


def message_type_name(cls: type) -> str:
    """The default stable name of a message class: its module-qualified name."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_message_type(cls: type, name: str) -> None:
    """Map ``name`` to ``cls``, replacing whatever the name pointed to before.

    A class is registered under one name only: giving it a new name retires the old one.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a message type name must be a non-empty str, got {name!r}")
    with _LOCK:
        previous = cls.__dict__.get("__message_type__")
        if previous is not None and previous != name and _TYPES.get(previous) is cls:
            del _TYPES[previous]
        _TYPES[name] = cls
        type.__setattr__(cls, "__message_type__", name)


def message_type(name: str) -> type | None:
    """The class registered under ``name``, or None."""
    return _TYPES.get(name)


def get_message_type(name: str) -> type | None:
    """The message class registered as ``name``, or else the one whose class name is
    ``name`` (PyDotCompute registers classes by bare class name); None when there is
    none. ``AmbiguousMessageTypeError`` when several classes have that class name."""
    cls = _TYPES.get(name)
    if cls is not None:
        return cls
    with _LOCK:
        named = {n: c for n, c in _TYPES.items() if c.__name__ == name}
    if len(named) > 1:
        raise AmbiguousMessageTypeError(
            f"{len(named)} message classes are named {name!r}: "
            f"{', '.join(sorted(named))}; ask for one by its registered name"
        )
    return next(iter(named.values()), None)
