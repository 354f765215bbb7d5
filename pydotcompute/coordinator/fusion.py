"""Fused chains: adjacent compiled ``cpu`` (or ``cuda``) kernel stages run as one kernel.

``plan_fusion(plan, runtime)`` looks at every pair of adjacent nodes of a compiled
graph and says whether the second can run in the first's kernel, and if not, why.
Maximal runs of pairs that can make *segments*; the flow launches one kernel per
segment whose compiled loop calls the stages' handlers in order (``backends.cpu_fused``;
on ``cuda`` one resident device loop, ``backends.cuda_fused``), and the segment's first
node runs it, sending its outputs where the segment's last node would. The graph's nodes are left as they are (same
journal fingerprint): the inner nodes keep their own unfused workers for items a
journal already holds there.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydotcompute.coordinator.plan import Node, Plan

__all__ = [
    "FusedSegment",
    "FusionPlan",
    "FusionReport",
    "LinkedSegment",
    "NotFused",
    "plan_fusion",
    "plan_links",
]


@dataclass(frozen=True)
class FusedSegment:
    """Stages run as one kernel: their names and kernels in order, and the id of the
    kernel that runs them (empty until the flow launched it)."""

    stages: tuple[str, ...]
    kernels: tuple[str, ...]
    kernel_id: str = ""


@dataclass(frozen=True)
class LinkedSegment:
    """Stages whose kernels are linked (``RingKernelRuntime.link``): each kernel's loop
    feeds the next one's input ring, and the items cross the event loop once for the
    whole segment. Their names and kernels, in order."""

    stages: tuple[str, ...]
    kernels: tuple[str, ...]
    copies: tuple[str, ...] = ()
    """A durable flow's: the kernels it launched (one per stage, each like the stage's
    own) and linked to run the segment; the graph's kernels run items the journal
    holds at the inner stages. Empty where the graph's own kernels are linked."""


@dataclass(frozen=True)
class NotFused:
    """Two adjacent steps that run apart, and why."""

    before: str
    after: str
    reason: str


@dataclass(frozen=True)
class FusionReport:
    """What ``Flow.explain()`` returns: the fused segments, each adjacent pair that was
    not fused with its reason, and :meth:`counts` per fused stage."""

    fused: tuple[FusedSegment, ...] = ()
    not_fused: tuple[NotFused, ...] = ()
    reader: Callable[[], dict[str, dict[str, int]]] | None = field(
        default=None, repr=False, compare=False
    )
    linked: tuple[LinkedSegment, ...] = ()
    """Runs of adjacent kernel stages that did not fuse and run linked instead."""
    not_linked: tuple[NotFused, ...] = ()
    """Adjacent kernel stages that neither fused nor run linked, and why not linked."""

    def counts(self) -> dict[str, dict[str, int]]:
        """Per stage of a fused segment: records ``processed``, ``emitted`` (passed on)
        and ``dropped`` (its handler returned False), since the flow started."""
        return {} if self.reader is None else self.reader()

    def link_reason(self, before: str, after: str) -> str | None:
        """Why the kernels of ``before`` and ``after`` (adjacent, not fused) were not
        linked (None when they were, or are not such a pair)."""
        for nf in self.not_linked:
            if nf.before == before and nf.after == after:
                return nf.reason
        return None

    def reason(self, before: str, after: str) -> str | None:
        """Why ``before`` and ``after`` were not fused (None when they were, or are not
        adjacent)."""
        for nf in self.not_fused:
            if nf.before == before and nf.after == after:
                return nf.reason
        return None


@dataclass
class FusionPlan:
    """The report and, per segment, its nodes in order."""

    report: FusionReport
    segments: list[list[Node]]


# The backends whose kernels fuse with a neighbour on the same backend: each runs a
# chain of compiled handlers in one loop (``cpu_fused``, ``cuda_fused``).
_FUSING_BACKENDS = ("cpu", "cuda")
# Backends whose kernels link (``RingKernelRuntime.link``): a shared ring on cpu, a ring
# in device memory between resident loops on cuda.
_LINKING_BACKENDS = ("cpu", "cuda")


def _kernel_info(runtime: Any, kid: str) -> tuple[Any, Any, str] | str:
    """(spec, handle, backend) of a launched kernel, or why it cannot be fused."""
    try:
        handle = runtime.kernel_handle(kid)
        spec = runtime.get_kernel_spec(kid)
    except Exception as exc:  # noqa: BLE001 - not launched (yet): said as the reason
        return f"kernel {kid!r} is not launched ({type(exc).__name__})"
    if getattr(spec.func, "fused_handlers", False):
        return f"kernel {kid!r} is already a fused chain"
    if runtime.get_placement(kid) is not None:
        return f"kernel {kid!r} is placed on a cluster"
    return spec, handle, handle.backend


def _kernel_pair(
    runtime: Any, a_id: str, b_id: str, uses: Counter[str]
) -> tuple[tuple[Any, Any, str], tuple[Any, Any, str]] | str:
    """Both kernels' (spec, handle, backend), or why the pair cannot be joined (fused
    or linked): a kernel that runs other stages too, or one :func:`_kernel_info`
    refuses."""
    for kid in (a_id, b_id):
        if uses[kid] > 1:
            return f"kernel used elsewhere: {kid!r} runs several stages"
    a = _kernel_info(runtime, a_id)
    if isinstance(a, str):
        return a
    b = _kernel_info(runtime, b_id)
    if isinstance(b, str):
        return b
    return a, b


def _record_dtype(t: Any) -> Any:
    from pydotcompute.messages.message import RingKernelMessage
    from pydotcompute.messages.record import record_layout

    if isinstance(t, type) and issubclass(t, RingKernelMessage):
        try:
            return record_layout(t).dtype
        except Exception:  # noqa: BLE001 - no record layout: not fusable, said so
            return None
    return None


def _pair_reason(
    plan: Plan, runtime: Any, n: Node, m: Node, uses: Counter[str], incoming: Counter[int]
) -> str | None:
    """Why ``m`` cannot run in ``n``'s fused kernel; None when it can."""
    if m.kind == "split":
        return "route" if m.mode == "route" else "fan-out"
    if n.edges[0][1] != 0 or m.parts > 1:
        return "fan-in (a join)"
    if incoming[m.index] > 1:
        return "fan-in (several steps lead here)"
    if m.is_batch or n.is_batch:
        return "batching FanIn"
    if n.stage is None or m.stage is None:
        return "join"
    for s in (n.stage, m.stage):
        if not isinstance(s.target, str):
            return f"not a kernel stage: {s.name!r} is a function"
    for s in (n.stage, m.stage):
        if not s.fuse:
            return f"fuse=False on {s.name!r}"
        if s.processes:
            return f"processes=True on {s.name!r}"
    if runtime is None:
        return "no runtime"
    a_id, b_id = str(n.stage.target), str(m.stage.target)
    pair = _kernel_pair(runtime, a_id, b_id, uses)
    if isinstance(pair, str):
        return pair
    (a_spec, _, a_backend), (b_spec, _, b_backend) = pair
    if a_backend != b_backend:
        return f"different backend: {a_id!r} runs on {a_backend}, {b_id!r} on {b_backend}"
    if a_backend not in _FUSING_BACKENDS:
        return f"backend {a_backend} does not fuse (only cpu and cuda)"
    apart = _compiled_apart(a_id, a_spec, a_backend, b_id, b_spec)
    if apart is not None:
        return apart
    ac, bc = a_spec.config, b_spec.config
    from pydotcompute.backends.options import CpuOptions, CudaOptions

    if a_backend == "cuda":
        if ac.options_for(CudaOptions) != bc.options_for(CudaOptions):
            return "different options: the kernels' cuda options differ"
    elif ac.workers != bc.workers or ac.options_for(CpuOptions) != bc.options_for(CpuOptions):
        return "different options: the kernels' workers or cpu options differ"
    sa, sb = n.stage, m.stage
    if (sa.retry, sa.timeout, sa.workers) != (sb.retry, sb.timeout, sb.workers):
        return "different options: the stages' retries, timeout or workers differ"
    return None


def plan_fusion(plan: Plan, runtime: Any) -> FusionPlan:
    """Which adjacent stages of ``plan`` run as one kernel on ``runtime``, with a reason
    for every adjacent pair that does not."""
    uses: Counter[str] = Counter(
        str(n.stage.target)
        for n in plan.calls
        if n.stage is not None and isinstance(n.stage.target, str)
    )
    incoming: Counter[int] = Counter()
    for node in plan.nodes:
        for edge in node.edges:
            incoming[edge[0]] += 1
    incoming[plan.entry[0]] += 1
    nxt: dict[int, Node] = {}
    not_fused: list[NotFused] = []
    # Nodes are numbered from the graph's end: reversed, a pipeline reads in order.
    for n in reversed(plan.calls):
        if len(n.edges) != 1 or n.edges[0][0] == plan.sink:
            continue
        m = plan.nodes[n.edges[0][0]]
        reason = _pair_reason(plan, runtime, n, m, uses, incoming)
        if reason is None:
            nxt[n.index] = m
        else:
            not_fused.append(NotFused(n.name, m.name, reason))
    segments = _chains(plan, nxt)
    fused = tuple(
        FusedSegment(
            tuple(x.name for x in seg),
            tuple(str(x.stage.target) for x in seg if x.stage is not None),
        )
        for seg in segments
    )
    return FusionPlan(FusionReport(fused, tuple(not_fused)), segments)


def fused_node(segment: list[Node], kernel_id: str) -> Node:
    """The segment's first node as its worker runs it: the fused kernel as its stage,
    and the last node's edges as its own (the ledger retires the item at the first
    node and writes the output where the last node would)."""
    head, tail = segment[0], segment[-1]
    assert head.stage is not None
    st = dataclasses.replace(head.stage, target=kernel_id)
    return dataclasses.replace(head, stage=st, edges=list(tail.edges))


async def launch_segment(runtime: Any, segment: list[Node], kernel_id: str) -> None:
    """Launch and activate the kernel that runs ``segment``'s handlers in order."""
    import numpy as np

    from pydotcompute.backends.cpu_fused import FusedHandlers, FusedStep

    steps = []
    for node in segment:
        assert node.stage is not None
        spec = runtime.get_kernel_spec(str(node.stage.target))
        cfg = spec.config
        state = np.zeros(0, np.float64) if cfg.state is None else np.array(cfg.state, copy=True)
        steps.append(
            FusedStep(
                node.name,
                spec.func,
                _record_dtype(spec.input_type),
                _record_dtype(spec.output_type),
                state,
            )
        )
    first = runtime.get_kernel_spec(str(segment[0].stage.target))  # type: ignore[union-attr]
    last = runtime.get_kernel_spec(str(segment[-1].stage.target))  # type: ignore[union-attr]
    await runtime.launch(
        kernel_id,
        FusedHandlers(steps),
        config=first.config.replace(state=None),
        input_type=first.input_type,
        output_type=last.output_type,
    )
    await runtime.activate(kernel_id)


def _compiled_apart(a_id: str, a_spec: Any, backend: str, b_id: str, b_spec: Any) -> str | None:
    """Why two kernels of one backend cannot be joined into one compiled path (fused or
    linked): CUDA C++ kernels, or records that are not ``@message`` ones or differ."""
    if backend == "cuda":
        from pydotcompute.backends.options import CudaOptions

        for kid, spec in ((a_id, a_spec), (b_id, b_spec)):
            if spec.config.options_for(CudaOptions).cuda_source is not None:
                return f"kernel {kid!r} runs CUDA C++ (cuda_source)"
    out_dt, in_dt = _record_dtype(a_spec.output_type), _record_dtype(b_spec.input_type)
    if out_dt is None or in_dt is None or _record_dtype(a_spec.input_type) is None:
        return "not @message records"
    if _record_dtype(b_spec.output_type) is None:
        return "not @message records"
    if out_dt != in_dt:
        return (
            f"record types differ: {a_id!r} sends {a_spec.output_type.__name__}, "
            f"{b_id!r} takes {b_spec.input_type.__name__}"
        )
    return None


def _link_reason(
    runtime: Any,
    n: Node,
    m: Node,
    uses: Counter[str],
    fused: set[int],
    durable: bool,
) -> str | None:
    """Why ``n``'s kernel cannot feed ``m``'s through a link; None when it can."""
    assert n.stage is not None and m.stage is not None
    for s in (n.stage, m.stage):
        if not s.link:
            return f"link=False on {s.name!r}"
    for x in (n, m):
        if x.index in fused:
            return f"{x.name!r} runs in a fused chain"
    a_id, b_id = str(n.stage.target), str(m.stage.target)
    pair = _kernel_pair(runtime, a_id, b_id, uses)
    if isinstance(pair, str):
        return pair
    (a_spec, _, a_backend), (b_spec, _, b_backend) = pair
    for kid, backend in ((a_id, a_backend), (b_id, b_backend)):
        if backend not in _LINKING_BACKENDS:
            return f"backend {backend} does not link (only cpu and cuda): {kid!r}"
    if a_backend != b_backend:
        return f"different backends: {a_id!r} runs on {a_backend}, {b_id!r} on {b_backend}"
    apart = _compiled_apart(a_id, a_spec, a_backend, b_id, b_spec)
    if apart is not None:
        return apart
    from pydotcompute.rings.backpressure import BackpressureStrategy

    if b_spec.config.backpressure is not BackpressureStrategy.BLOCK:
        # A record a link drops would read as filtered: only a waiting ring is linked.
        return f"{b_id!r} drops or refuses records when full ({b_spec.config.backpressure.name})"
    sa, sb = n.stage, m.stage
    if (sa.retry, sa.timeout, sa.workers) != (sb.retry, sb.timeout, sb.workers):
        return "different options: the stages' retries, timeout or workers differ"
    links = runtime.links
    if not durable and (a_id in links or b_id in links.values()):
        return f"already linked: {a_id!r} or {b_id!r} has a link of its own"
    return None


def plan_links(
    plan: Plan, runtime: Any, fusion: FusionPlan, *, durable: bool
) -> tuple[list[list[Node]], tuple[NotFused, ...]]:
    """Runs of adjacent kernel stages that did not fuse and whose kernels can be linked
    (head first), and why each other such pair cannot."""
    if runtime is None:
        return [], ()
    uses: Counter[str] = Counter(
        str(n.stage.target)
        for n in plan.calls
        if n.stage is not None and isinstance(n.stage.target, str)
    )
    fused = {x.index for seg in fusion.segments for x in seg}
    apart = {(nf.before, nf.after) for nf in fusion.report.not_fused}
    nxt: dict[int, Node] = {}
    not_linked: list[NotFused] = []
    for n in reversed(plan.calls):
        if len(n.edges) != 1 or n.edges[0][0] == plan.sink:
            continue
        m = plan.nodes[n.edges[0][0]]
        if (n.name, m.name) not in apart or m.kind != "call" or n.stage is None:
            continue
        if m.stage is None or not isinstance(n.stage.target, str):
            continue
        if not isinstance(m.stage.target, str) or m.parts > 1 or n.edges[0][1] != 0:
            continue
        if n.is_batch or m.is_batch or n.stage.processes or m.stage.processes:
            continue
        if sum(1 for x in plan.nodes for e in x.edges if e[0] == m.index) > 1:
            continue
        reason = _link_reason(runtime, n, m, uses, fused, durable)
        if reason is None:
            nxt[n.index] = m
        else:
            not_linked.append(NotFused(n.name, m.name, reason))
    return _chains(plan, nxt), tuple(not_linked)


def _chains(plan: Plan, nxt: dict[int, Node]) -> list[list[Node]]:
    """The maximal chains the pairs ``node -> nxt[node]`` make, in graph order."""
    inner = {m.index for m in nxt.values()}
    chains: list[list[Node]] = []
    for n in reversed(plan.calls):
        if n.index in nxt and n.index not in inner:
            chain = [n]
            while chain[-1].index in nxt:
                chain.append(nxt[chain[-1].index])
            chains.append(chain)
    return chains


def linked_node(chain: list[Node], kernel_id: str) -> Node:
    """The chain's first node as its worker runs it: the first linked kernel as its
    stage and the last node's edges as its own (the items leave the last kernel; the
    journal retires them at the first node and writes them where the last node would)."""
    head, tail = chain[0], chain[-1]
    assert head.stage is not None
    st = dataclasses.replace(head.stage, target=kernel_id)
    return dataclasses.replace(head, stage=st, edges=list(tail.edges))


async def launch_copy(runtime: Any, kernel_id: str, copy_id: str) -> None:
    """Launch and activate a kernel made like ``kernel_id`` (its handler, types and
    configuration, its declared state) under ``copy_id``."""
    spec = runtime.get_kernel_spec(kernel_id)
    await runtime.launch(
        copy_id,
        spec.func,
        config=spec.config,
        input_type=spec.input_type,
        output_type=spec.output_type,
    )
    await runtime.activate(copy_id)
