"""Describing a flow: stages, pipelines, fan-out/fan-in, routes and DAGs.

These classes only describe; :mod:`pydotcompute.coordinator.plan` turns a description into
nodes and edges, and :class:`~pydotcompute.coordinator.flow.Flow` runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydotcompute.coordinator.retry import RetryPolicy
from pydotcompute.errors import InvalidConfigurationError

__all__ = [
    "DAG",
    "FanIn",
    "FanOut",
    "Graph",
    "Pipeline",
    "Route",
    "Stage",
    "as_graph",
    "route",
    "stage",
]

FANOUT_MODES = ("round_robin", "least_loaded", "broadcast", "key_hash")


class Graph:
    """Anything that can be a step of a flow; ``a >> b`` chains two steps."""

    def __rshift__(self, other: Any) -> Pipeline:
        return Pipeline(self, other)

    def __rrshift__(self, other: Any) -> Pipeline:
        return Pipeline(other, self)


@dataclass(eq=False)
class Stage(Graph):
    """One step that turns an item into a new item.

    ``target`` is a function (sync or async, ``fn(item)`` or ``fn(item, state)``) or the id
    of a launched kernel. ``workers`` run it concurrently; ``buffer`` bounds the items
    waiting for them. ``state`` is a factory called once per worker (default: an empty
    dict for two-argument functions). ``processes=True`` runs a sync, module-level
    function in ``workers`` child processes. ``timeout`` bounds one kernel round trip.
    ``fuse=False`` keeps a kernel stage out of fused chains (see ``coordinator.fusion``);
    ``link=False`` keeps it from being linked to its neighbours' kernels.
    """

    target: Callable[..., Any] | str
    name: str = ""
    workers: int = 1
    buffer: int = 64
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    processes: bool = False
    state: Callable[[], Any] | None = None
    timeout: float | None = None
    fuse: bool = True
    link: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            if isinstance(self.target, str):
                self.name = self.target
            else:
                self.name = getattr(self.target, "__name__", type(self.target).__name__)
        if self.workers < 1:
            raise InvalidConfigurationError(f"stage {self.name!r}: workers must be >= 1")
        if self.buffer < 1:
            raise InvalidConfigurationError(f"stage {self.name!r}: buffer must be >= 1")
        if not isinstance(self.target, str) and not callable(self.target):
            raise InvalidConfigurationError(
                f"stage {self.name!r}: target must be callable or a kernel id"
            )
        if self.processes and isinstance(self.target, str):
            raise InvalidConfigurationError(f"stage {self.name!r}: processes=True needs a function")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped function directly (handy in tests)."""
        if isinstance(self.target, str):
            raise TypeError(f"stage {self.name!r} is a kernel id, not a function")
        return self.target(*args, **kwargs)


def stage(
    fn: Callable[..., Any] | str | None = None,
    *,
    workers: int = 1,
    buffer: int = 64,
    retries: int | RetryPolicy = 1,
    backoff: float = 0.05,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    processes: bool = False,
    state: Callable[[], Any] | None = None,
    timeout: float | None = None,
    name: str | None = None,
    fuse: bool = True,
    link: bool = True,
) -> Any:
    """Wrap a function or kernel id as a :class:`Stage`; usable as ``@stage`` or ``@stage(...)``.

    ``retries`` is the most runs an item gets at this stage (``retries=3``: three runs, then
    the dead letters), or a full :class:`RetryPolicy`. ``fuse=False`` keeps this stage
    out of fused chains of compiled kernels; ``link=False`` keeps its kernel from being
    linked to the kernels of the stages beside it.
    """
    policy = (
        retries
        if isinstance(retries, RetryPolicy)
        else RetryPolicy(attempts=retries, backoff=backoff, retry_on=retry_on)
    )

    def wrap(target: Callable[..., Any] | str) -> Stage:
        return Stage(
            target,
            name=name or "",
            workers=workers,
            buffer=buffer,
            retry=policy,
            processes=processes,
            state=state,
            timeout=timeout,
            fuse=fuse,
            link=link,
        )

    return wrap if fn is None else wrap(fn)


def as_graph(step: Any) -> Graph:
    """A graph step from a Graph, a function or a kernel id."""
    if isinstance(step, Graph):
        return step
    if isinstance(step, str) or callable(step):
        return Stage(step)
    raise InvalidConfigurationError(f"not a flow step: {step!r}")


class Pipeline(Graph):
    """Steps run one after another; nested pipelines are flattened."""

    def __init__(self, *steps: Any) -> None:
        if not steps:
            raise InvalidConfigurationError("a Pipeline needs at least one step")
        flat: list[Graph] = []
        for step in steps:
            g = as_graph(step)
            flat.extend(g.steps if isinstance(g, Pipeline) else [g])
        self.steps: tuple[Graph, ...] = tuple(flat)

    def __repr__(self) -> str:
        return " >> ".join(repr(s) for s in self.steps)


class FanOut(Graph):
    """Send each item to one branch (``round_robin``, ``least_loaded``, ``key_hash``) or to
    every branch (``broadcast``, joined by item key by the :class:`FanIn` that follows)."""

    def __init__(self, *branches: Any, mode: str = "round_robin") -> None:
        if len(branches) < 1:
            raise InvalidConfigurationError("FanOut needs at least one branch")
        if mode not in FANOUT_MODES:
            raise InvalidConfigurationError(
                f"FanOut mode must be one of {FANOUT_MODES}, got {mode!r}"
            )
        self.branches = tuple(as_graph(b) for b in branches)
        self.mode = mode


class FanIn(Graph):
    """Merge what a broadcast produced for one item, or collect items into batches.

    After a broadcast ``FanOut``: ``merge`` gets the branches' outputs for one item key,
    as a list in branch order (the identity if ``merge`` is None). With ``count`` and/or
    ``timeout``: ``merge`` gets up to ``count`` items (or those that arrived within
    ``timeout`` seconds of the first) and returns a list with one output per input, in
    order, so every item keeps its own key.
    """

    def __init__(
        self,
        merge: Callable[..., Any] | Stage | None = None,
        *,
        count: int | None = None,
        timeout: float | None = None,
    ) -> None:
        if count is not None and count < 1:
            raise InvalidConfigurationError("FanIn count must be >= 1")
        if timeout is not None and timeout <= 0:
            raise InvalidConfigurationError("FanIn timeout must be > 0")
        self.batching = count is not None or timeout is not None
        if self.batching and merge is None:
            raise InvalidConfigurationError("a batching FanIn needs a merge function")
        self.merge = merge
        self.count = count
        self.timeout = timeout


@dataclass(eq=False)
class Route(Graph):
    """Items for which ``predicate(item)`` is true go through ``if_true``, the others
    through ``if_false`` (straight on when None); both continue with the next step."""

    predicate: Callable[[Any], bool]
    if_true: Graph
    if_false: Graph | None = None


def route(predicate: Callable[[Any], bool], if_true: Any, if_false: Any = None) -> Route:
    """Branch on a predicate; see :class:`Route`."""
    return Route(predicate, as_graph(if_true), None if if_false is None else as_graph(if_false))


class DAG(Graph):
    """Named steps and the steps each runs after.

    A step with several predecessors joins them by item key and receives a dict
    ``{predecessor name: output}``; a step with several successors sends its output to
    each. There must be one first step and one last step. Unknown names and cycles raise
    :class:`InvalidConfigurationError` from :meth:`validate`, which deploying calls.
    """

    def __init__(self) -> None:
        self.steps: dict[str, Graph] = {}
        self.after: dict[str, tuple[str, ...]] = {}

    def add(self, name: str, step: Any, *, after: str | Iterable[str] = ()) -> DAG:
        """Add step ``name`` running after ``after`` (a name or names); returns self."""
        if name in self.steps:
            raise InvalidConfigurationError(f"DAG step {name!r} added twice")
        self.steps[name] = as_graph(step)
        self.after[name] = (after,) if isinstance(after, str) else tuple(after)
        return self

    def successors(self) -> dict[str, list[str]]:
        succ: dict[str, list[str]] = {n: [] for n in self.steps}
        for n, preds in self.after.items():
            for p in preds:
                succ[p].append(n)
        return succ

    def order(self) -> list[str]:
        """Step names in topological order; raises on unknown names or a cycle."""
        for n, preds in self.after.items():
            unknown = [p for p in preds if p not in self.steps]
            if unknown:
                raise InvalidConfigurationError(
                    f"DAG step {n!r} runs after unknown step(s) {unknown}"
                )
            if len(set(preds)) != len(preds):
                raise InvalidConfigurationError(f"DAG step {n!r} lists a predecessor twice")
        if not self.steps:
            raise InvalidConfigurationError("a DAG needs at least one step")
        succ = self.successors()
        indegree = {n: len(p) for n, p in self.after.items()}
        ready = [n for n in self.steps if indegree[n] == 0]
        out: list[str] = []
        while ready:
            n = ready.pop(0)
            out.append(n)
            for s in succ[n]:
                indegree[s] -= 1
                if indegree[s] == 0:
                    ready.append(s)
        if len(out) != len(self.steps):
            cyclic = sorted(n for n in self.steps if n not in out)
            raise InvalidConfigurationError(f"DAG has a cycle through {cyclic}")
        return out

    def validate(self) -> None:
        order = self.order()
        sources = [n for n in order if not self.after[n]]
        sinks = [n for n, s in self.successors().items() if not s]
        if len(sources) != 1:
            raise InvalidConfigurationError(f"a DAG needs exactly one first step, found {sources}")
        if len(sinks) != 1:
            raise InvalidConfigurationError(
                f"a DAG needs exactly one last step, found {sorted(sinks)}"
            )
