"""The text of ``/metrics`` for a registry holding only this package's collector.

``prometheus_client``'s encoders validate and escape every metric and label name of
every sample; for the plain families this package yields (counters, gauges and
histograms with names that need no escaping) that is most of a scrape's cost. The
writer here produces the same bytes directly, and declines (returns None) whatever it
does not mirror exactly, so the caller falls back to the library's encoder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import partial

from prometheus_client import exposition as _text
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as _om
from prometheus_client.utils import floatToGoString

__all__ = ["writer_for"]

Writer = Callable[[Iterable[Metric]], "bytes | None"]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_TYPES = frozenset(("counter", "gauge", "histogram"))
# Escapings that leave a name of the legacy character set as it is.
_PLAIN_NAMES = frozenset((_om.UNDERSCORES, _om.ALLOWUTF8))


def writer_for(encoder: Callable[..., bytes]) -> Writer | None:
    """The writer that produces what ``encoder`` (as ``choose_encoder`` picks it) would,
    or None where the request asks for something it does not mirror."""
    if encoder is _text.generate_latest:
        return partial(_write, openmetrics=False)
    if not isinstance(encoder, partial) or encoder.args:
        return None
    kw = encoder.keywords
    if encoder.func is _text.generate_latest and kw.keys() == {"escaping"}:
        return partial(_write, openmetrics=False) if kw["escaping"] in _PLAIN_NAMES else None
    if (
        encoder.func is _om.generate_latest
        and kw.keys() == {"escaping", "version"}
        and kw["escaping"] in _PLAIN_NAMES
        and kw["version"] == "1.0.0"
    ):
        return partial(_write, openmetrics=True)
    return None


def _label_value(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


def _write(metrics: Iterable[Metric], openmetrics: bool) -> bytes | None:
    out: list[str] = []
    add = out.append
    label_names_ok: dict[tuple[str, ...], bool] = {}
    for m in metrics:
        name, mtype = m.name, m.type
        if mtype not in _TYPES or not _NAME.match(name):
            return None
        doc = m.documentation.replace("\\", r"\\").replace("\n", r"\n")
        if openmetrics:
            doc = doc.replace('"', r"\"")
            add(f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n")
            if m.unit:
                add(f"# UNIT {name} {m.unit}\n")
        else:
            shown = name + "_total" if mtype == "counter" else name
            add(f"# HELP {shown} {doc}\n# TYPE {shown} {mtype}\n")
        for s in m.samples:
            if (
                s.timestamp is not None
                or s.exemplar is not None
                or s.native_histogram is not None
                or not s.name.startswith(name)
                or s.name.endswith(("_created", "_gsum", "_gcount"))
                or not _NAME.match(s.name)
            ):
                return None
            if s.labels:
                items = sorted(s.labels.items())
                keys = tuple(k for k, _ in items)
                ok = label_names_ok.get(keys)
                if ok is None:
                    ok = label_names_ok[keys] = all(_LABEL_NAME.match(k) for k in keys)
                if not ok:
                    return None
                labels = ",".join([f'{k}="{_label_value(v)}"' for k, v in items])
                add(f"{s.name}{{{labels}}} {floatToGoString(s.value)}\n")
            else:
                add(f"{s.name} {floatToGoString(s.value)}\n")
    if openmetrics:
        add("# EOF\n")
    return "".join(out).encode("utf-8")
