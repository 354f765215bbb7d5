"""The text of ``/metrics`` written directly, for a registry holding only this
package's collector.

``prometheus_client``'s encoders validate and escape every metric and label name of
every sample, and need metric family objects built first; for the plain families this
package yields (counters, gauges and histograms with names that need no escaping) that
is most of a scrape's cost. The functions here produce the same bytes directly, and
decline whatever they do not mirror exactly, so the caller falls back to the library.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import partial

from prometheus_client import exposition as _text
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as _om
from prometheus_client.utils import floatToGoString

__all__ = ["text_format", "family_header", "label_value", "write_families"]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_TYPES = frozenset(("counter", "gauge", "histogram"))
# Escapings that leave a name of the legacy character set as it is.
_PLAIN_NAMES = frozenset((_om.UNDERSCORES, _om.ALLOWUTF8))


def text_format(encoder: Callable[..., bytes]) -> str | None:
    """``"text"`` or ``"openmetrics"`` where this module writes what ``encoder`` (as
    ``choose_encoder`` picks it) would; None where the request asks for anything else."""
    if encoder is _text.generate_latest:
        return "text"
    if not isinstance(encoder, partial) or encoder.args:
        return None
    kw = encoder.keywords
    if encoder.func is _text.generate_latest and kw.keys() == {"escaping"}:
        return "text" if kw["escaping"] in _PLAIN_NAMES else None
    if (
        encoder.func is _om.generate_latest
        and kw.keys() == {"escaping", "version"}
        and kw["escaping"] in _PLAIN_NAMES
        and kw["version"] == "1.0.0"
    ):
        return "openmetrics"
    return None


def label_value(v: str) -> str:
    """A label value escaped as both formats escape it."""
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


def family_header(name: str, mtype: str, doc: str, openmetrics: bool) -> str:
    """The ``# HELP`` and ``# TYPE`` lines of a family (a counter is ``name_total`` in
    the text format)."""
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    if openmetrics:
        doc = doc.replace('"', r"\"")
    elif mtype == "counter":
        name += "_total"
    return f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n"


def write_families(out: list[str], metrics: Iterable[Metric], openmetrics: bool) -> bool:
    """Append the lines of ``metrics``; False (stop) at anything not mirrored exactly."""
    label_names_ok: dict[tuple[str, ...], bool] = {}
    for m in metrics:
        name, mtype = m.name, m.type
        if mtype not in _TYPES or not _NAME.match(name):
            return False
        out.append(family_header(name, mtype, m.documentation, openmetrics))
        if openmetrics and m.unit:
            out.append(f"# UNIT {name} {m.unit}\n")
        for s in m.samples:
            if (
                s.timestamp is not None
                or s.exemplar is not None
                or s.native_histogram is not None
                or not s.name.startswith(name)
                or s.name.endswith(("_created", "_gsum", "_gcount"))
                or not _NAME.match(s.name)
            ):
                return False
            if s.labels:
                items = sorted(s.labels.items())
                keys = tuple(k for k, _ in items)
                ok = label_names_ok.get(keys)
                if ok is None:
                    ok = label_names_ok[keys] = all(_LABEL_NAME.match(k) for k in keys)
                if not ok:
                    return False
                labels = ",".join([f'{k}="{label_value(v)}"' for k, v in items])
                out.append(f"{s.name}{{{labels}}} {floatToGoString(s.value)}\n")
            else:
                out.append(f"{s.name} {floatToGoString(s.value)}\n")
    return True
