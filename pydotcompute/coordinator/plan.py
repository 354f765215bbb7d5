"""Compile a graph description into nodes and edges the flow executor runs.

Items only ever wait at ``call`` nodes (port 0 is a node's input; ports 1..k are the
parts a join node collects per item key). ``split`` nodes decide where an output goes
and hold no items; the single ``sink`` node is where an item finishes.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydotcompute.coordinator.graph import (
    DAG,
    FanIn,
    FanOut,
    Graph,
    Pipeline,
    Route,
    Stage,
    as_graph,
)
from pydotcompute.errors import InvalidConfigurationError

__all__ = ["Edge", "Node", "Plan", "compile_graph"]

Edge = tuple[int, int]  # (node index, port)

SINK = 0  # compile_graph makes the node where items finish first
ROUTE_PREFIX = "route:"  # names a Route's split: the one kind of split node that can fail


@dataclass(eq=False)
class Node:
    """One node of a compiled flow."""

    index: int
    name: str
    kind: str  # "call" | "split" | "sink"
    stage: Stage | None = None  # call: what runs (None: pass the value on)
    edges: list[Edge] = field(default_factory=list)
    mode: str = ""  # split: round_robin | least_loaded | key_hash | broadcast | route
    predicate: Callable[[Any], bool] | None = None
    parts: int = 0  # call: >1 means a join of this many parts per key
    part_names: tuple[str, ...] | None = None  # join: dict keys, else a list
    batch_count: int | None = None
    batch_timeout: float | None = None
    turns: int = 0  # round robin: items sent so far (per deployed flow: plans are not shared)

    @property
    def is_batch(self) -> bool:
        return self.batch_count is not None or self.batch_timeout is not None

    def describe(self) -> list[Any]:
        return [self.name, self.kind, self.edges, self.mode, self.parts, self.part_names]


class Plan:
    """The nodes of one graph, the entry edge and a fingerprint of the structure."""

    def __init__(self, nodes: list[Node], entry: Edge) -> None:
        self.nodes = nodes
        self.entry = entry
        self.sink = next(n.index for n in nodes if n.kind == "sink")
        self.calls = [n for n in nodes if n.kind == "call"]
        text = json.dumps([n.describe() for n in nodes] + [list(entry)], sort_keys=True)
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()

    @property
    def stage_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def join_value(self, node: Node, parts: dict[int, Any]) -> Any:
        """The value a join node's function receives, from its parts keyed by port."""
        ordered = [parts[p] for p in range(1, node.parts + 1)]
        if node.part_names is not None:
            return dict(zip(node.part_names, ordered, strict=True))
        return ordered

    def pick(self, node: Node, key: str, value: Any, load: Callable[[Edge], int]) -> list[Edge]:
        """The edges a split node sends ``value`` along."""
        if node.mode == "broadcast":
            return node.edges
        if node.mode == "route":
            assert node.predicate is not None
            return [node.edges[0] if node.predicate(value) else node.edges[1]]
        if node.mode == "key_hash":
            # crc32, not hash(): it must agree across processes sharing a journal.
            return [node.edges[zlib.crc32(key.encode()) % len(node.edges)]]
        if node.mode == "least_loaded":
            return [min(node.edges, key=load)]
        node.turns += 1  # round robin
        return [node.edges[(node.turns - 1) % len(node.edges)]]


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.names: dict[str, int] = {}

    def add(self, base: str, kind: str, **kw: Any) -> Node:
        count = self.names.get(base, 0) + 1
        self.names[base] = count
        name = base if count == 1 else f"{base}#{count}"
        node = Node(index=len(self.nodes), name=name, kind=kind, **kw)
        self.nodes.append(node)
        return node

    def build(self, g: Graph, out: Edge) -> Edge:
        """Add the nodes of ``g`` whose output goes to ``out``; return g's entry edge."""
        if isinstance(g, Stage):
            return (self.add(g.name, "call", stage=g, edges=[out]).index, 0)
        if isinstance(g, Pipeline):
            return self.build_steps(list(g.steps), out)
        if isinstance(g, FanOut):
            return self.build_fanout(g, None, out)
        if isinstance(g, FanIn):
            if not g.batching:
                raise InvalidConfigurationError(
                    "a FanIn without count/timeout must follow a broadcast FanOut"
                )
            st = g.merge if isinstance(g.merge, Stage) else Stage(g.merge)  # type: ignore[arg-type]
            node = self.add(
                st.name,
                "call",
                stage=st,
                edges=[out],
                batch_count=g.count,
                batch_timeout=g.timeout,
            )
            return (node.index, 0)
        if isinstance(g, Route):
            no = self.build(g.if_false, out) if g.if_false is not None else out
            yes = self.build(g.if_true, out)
            name = f"{ROUTE_PREFIX}{getattr(g.predicate, '__name__', 'predicate')}"
            node = self.add(name, "split", mode="route", predicate=g.predicate, edges=[yes, no])
            return (node.index, 0)
        if isinstance(g, DAG):
            return self.build_dag(g, out)
        raise InvalidConfigurationError(f"not a flow step: {g!r}")

    def build_steps(self, steps: list[Graph], out: Edge) -> Edge:
        i = len(steps) - 1
        while i >= 0:
            g = steps[i]
            if isinstance(g, FanIn) and not g.batching:
                prev = steps[i - 1] if i > 0 else None
                if not (isinstance(prev, FanOut) and prev.mode == "broadcast"):
                    raise InvalidConfigurationError(
                        "a FanIn without count/timeout must follow a broadcast FanOut"
                    )
                out = self.build_fanout(prev, g, out)
                i -= 2
                continue
            out = self.build(g, out)
            i -= 1
        return out

    def build_fanout(self, g: FanOut, fan_in: FanIn | None, out: Edge) -> Edge:
        if g.mode != "broadcast":
            entries = [self.build(b, out) for b in g.branches]
            return (self.add(f"fanout:{g.mode}", "split", mode=g.mode, edges=entries).index, 0)
        merge = fan_in.merge if fan_in is not None else None
        st = merge if isinstance(merge, Stage) or merge is None else Stage(merge)
        join = self.add(
            st.name if st is not None else "join",
            "call",
            stage=st,
            edges=[out],
            parts=len(g.branches),
        )
        entries = [self.build(b, (join.index, i + 1)) for i, b in enumerate(g.branches)]
        return (self.add("fanout:broadcast", "split", mode="broadcast", edges=entries).index, 0)

    def build_dag(self, g: DAG, out: Edge) -> Edge:
        g.validate()
        order = g.order()
        succ = g.successors()
        entry: dict[str, list[Edge]] = {}  # per step: entry edge for each predecessor
        for name in reversed(order):
            targets = [entry[s][g.after[s].index(name)] for s in succ[name]]
            if not targets:
                step_out = out
            elif len(targets) == 1:
                step_out = targets[0]
            else:
                split = self.add(f"{name}:broadcast", "split", mode="broadcast", edges=targets)
                step_out = (split.index, 0)
            preds = g.after[name]
            if len(preds) > 1:
                inner = self.build(g.steps[name], step_out)
                join = self.add(
                    f"{name}:join",
                    "call",
                    stage=None,
                    edges=[inner],
                    parts=len(preds),
                    part_names=preds,
                )
                entry[name] = [(join.index, i + 1) for i in range(len(preds))]
            else:
                entry[name] = [self.build(g.steps[name], step_out)]
        source = next(n for n in order if not g.after[n])
        return entry[source][0]


def compile_graph(graph: Any) -> Plan:
    """Validate ``graph`` and compile it; raises InvalidConfigurationError before anything runs."""
    b = _Builder()
    sink = b.add("result", "sink")
    assert sink.index == SINK
    entry = b.build(as_graph(graph), (sink.index, 0))
    return Plan(b.nodes, entry)
