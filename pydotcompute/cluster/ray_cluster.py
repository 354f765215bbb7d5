"""A runtime's connection to a Ray cluster, where it places kernels on Ray actors.

Ray keeps one connection per process. A runtime joins it on its first launch (starting
a local Ray instance for ``cluster="local"`` unless the process is connected already) and leaves it at
shutdown; the connection is shut down when the last runtime that joined it leaves, and
only if a runtime started it. A connection the application opened itself with
``ray.init`` is used as is and never shut down here. Runtimes share the connection,
never kernels: each kernel is an unnamed actor owned by the runtime that launched it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from typing import TYPE_CHECKING, Any

from pydotcompute.backends.config import RingKernelConfig
from pydotcompute.cluster.placement import KernelPlacement
from pydotcompute.errors import (
    BackendNotAvailableError,
    InvalidConfigurationError,
    PlacementTimeoutError,
)

if TYPE_CHECKING:
    from pydotcompute.backends.base import FailureCallback
    from pydotcompute.cluster.ray_backend import RayKernelBackend

__all__ = ["KernelPlacement", "RayCluster", "require_ray"]

INSTALL_HINT = 'pip install "pydotcompute[ray]"'


def require_ray() -> None:
    """Raise ``BackendNotAvailableError`` unless Ray can be imported."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # ValueError: a module entry without a spec
        found = False
    if not found:
        raise BackendNotAvailableError(
            f"placing kernels on a cluster needs Ray, which is not installed: {INSTALL_HINT}"
        )


class _ProcessConnection:
    """The process's one Ray connection, counted by the runtimes that joined it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._started = False

    def join(self, address: str) -> None:
        import ray

        with self._lock:
            if ray.is_initialized():
                _check_same_cluster(ray, address)
            else:
                # "local" is Ray's own word for "start a new instance here"; a
                # dashboard is for clusters that someone started on purpose.
                try:
                    ray.init(
                        address=address, include_dashboard=False if address == "local" else None
                    )
                except ConnectionError as exc:
                    raise BackendNotAvailableError(
                        f"cannot join the Ray cluster at {address}: {exc}. A cluster started "
                        "with token authentication (Ray's default for `ray start --head` since "
                        "2.59) also needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or "
                        "the file ~/.ray/auth_token) in this process's environment"
                    ) from exc
                self._started = True
            self._users += 1

    def leave(self) -> None:
        import ray

        with self._lock:
            self._users -= 1
            if self._users == 0 and self._started:
                self._started = False
                ray.shutdown()


_CONNECTION = _ProcessConnection()


def _needs(config: RingKernelConfig) -> dict[str, float]:
    need = {"CPU": config.num_cpus, "GPU": config.num_gpus, **config.resources}
    return {k: v for k, v in need.items() if v}


def describe_holders(need: dict[str, float]) -> str:
    """Which live nodes offer ``need``, how much of it each has free, and which actors
    hold it there (kernels by id: ``KernelActor`` names itself so). Best effort: what
    cannot be read (through a Ray Client connection, say) is said, not guessed."""
    import ray

    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception as exc:  # a description must not mask the timeout
        return f"(The cluster's nodes could not be listed: {exc}.)"
    offering = {
        n["NodeID"]: n
        for n in nodes
        if all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items())
    }
    try:
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
    except Exception:  # private API: say less rather than fail
        free = {}
    parts = []
    for nid, n in offering.items():
        have = ", ".join(
            f"{k} {free.get(nid, {}).get(k, 0):g} of {n['Resources'][k]:g} free"
            if nid in free
            else f"{k} {n['Resources'][k]:g}"
            for k in need
        )
        parts.append(f"node {nid[:12]} ({n.get('NodeManagerAddress', '?')}): {have}")
    text = "Nodes that offer it: " + ("; ".join(parts) or "none now") + "."
    try:
        holders = _actors_holding(need, set(offering))
    except Exception as exc:  # private API: say less rather than fail
        return f"{text} (What holds it could not be listed: {exc}.)"
    return f"{text} Held by: {'; '.join(holders) or 'nothing this driver can see'}."


def _actors_holding(need: dict[str, float], nodes: set[str]) -> list[str]:
    """Live actors on ``nodes`` that reserved any of ``need``, read from Ray's actor
    table (which names the actor and what it reserved)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    out = []
    for raw in state._connect_and_get_accessor().get_actor_table(None, "ALIVE"):
        actor = gcs_pb2.ActorTableData.FromString(raw)
        node = actor.address.node_id.hex()
        reserved = dict(actor.required_resources)
        held = {k: reserved[k] for k in need if reserved.get(k)}
        if held and node in nodes:
            name = actor.repr_name or actor.class_name
            out.append(f"{name} (pid {actor.pid}, node {node[:12]}) with {held}")
    return out


def _check_same_cluster(ray: Any, address: str) -> None:
    if address in ("local", "auto") or address.startswith("ray://"):
        return  # whichever cluster this process is connected to
    current = ray.get_runtime_context().gcs_address
    if address != current:
        raise InvalidConfigurationError(
            f"this process is connected to the Ray cluster at {current}; a process talks "
            f"to one Ray cluster, so it cannot also place kernels on {address}"
        )


class RayCluster:
    """One runtime's hold on the Ray connection and its kernels' actor class.

    ``address`` is ``"local"`` (a new Ray instance on this machine, started by the
    runtime), ``"auto"`` (the cluster this machine belongs to), a ``host:port`` GCS
    address or a ``ray://host:port`` client address. A process that is already
    connected to Ray (``ray.init`` called by the application or another runtime)
    keeps that connection.
    """

    def __init__(self, address: str) -> None:
        if not isinstance(address, str) or not address:
            raise InvalidConfigurationError(
                f"cluster must be 'local', 'auto' or a Ray address, got {address!r}"
            )
        require_ray()
        self.address = address
        self._joined = False
        self._joining: asyncio.Lock | None = None
        self._actor_class: Any = None

    async def connect(self) -> None:
        """Join the process's Ray connection (once; ``ray.init`` runs off the event loop)."""
        if self._joining is None:
            self._joining = asyncio.Lock()
        async with self._joining:
            if self._joined:
                return
            await asyncio.to_thread(_CONNECTION.join, self.address)
            self._joined = True
            import ray

            from pydotcompute.cluster.ray_actor import KernelActor

            self._actor_class = ray.remote(KernelActor)

    async def close(self) -> None:
        """Leave the connection (after every kernel of the runtime has stopped)."""
        if self._joined:
            self._joined = False
            self._actor_class = None
            await asyncio.to_thread(_CONNECTION.leave)

    @staticmethod
    def backend_class() -> type[RayKernelBackend]:
        """The class that stands for a kernel placed on this cluster."""
        from pydotcompute.cluster.ray_backend import RayKernelBackend

        return RayKernelBackend

    def kernel_backend(
        self,
        kernel_id: str,
        func: Any,
        config: RingKernelConfig,
        input_type: Any,
        output_type: Any,
        on_failure: FailureCallback,
        **links: Any,
    ) -> RayKernelBackend:
        """The backend that runs this kernel on an actor of this cluster."""
        from pydotcompute.cluster.ray_backend import RayKernelBackend

        return RayKernelBackend(
            kernel_id, func, config, input_type, output_type, on_failure, cluster=self, **links
        )

    async def spawn(self, kernel_id: str, config: RingKernelConfig, args: tuple[Any, ...]) -> Any:
        """Create the actor of one kernel with the resources it asks for."""
        await self.connect()
        self._check_fits(kernel_id, config)
        options: dict[str, Any] = {
            "num_cpus": config.num_cpus,
            "num_gpus": config.num_gpus,
            "max_restarts": 0,  # a dead actor is a FAILED kernel; restarting is policy
        }
        if config.resources:
            options["resources"] = dict(config.resources)
        return self._actor_class.options(**options).remote(*args)

    async def placed(self, kernel_id: str, config: RingKernelConfig, actor: Any) -> None:
        """Wait until ``actor`` runs (a node had the kernel's resources free and started its
        process), at most ``config.launch_timeout`` seconds; then ``PlacementTimeoutError``
        naming what the kernel asked for and what holds it. The caller kills the actor
        on any error, which withdraws its pending placement: nothing is left waiting."""
        ref = actor.placed.remote()
        try:
            await asyncio.wait_for(asyncio.wrap_future(ref.future()), config.launch_timeout)
        except asyncio.TimeoutError:
            need = _needs(config)
            held = await asyncio.to_thread(describe_holders, need)
            raise PlacementTimeoutError(
                f"kernel {kernel_id!r} waited {config.launch_timeout:g} s (its launch_timeout) "
                f"for {need or 'an actor process'}, which the cluster has but which stayed "
                f"taken. {held} Terminate what holds them, add nodes that offer them, or "
                "launch with a longer launch_timeout; this launch left nothing behind."
            ) from None

    @staticmethod
    def _check_fits(kernel_id: str, config: RingKernelConfig) -> None:
        """Fail at launch, not hang, when no live node can ever hold the kernel."""
        import ray

        need = _needs(config)
        if not need:
            return
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not any(all(res.get(k, 0) >= v for k, v in need.items()) for res in nodes):
            raise BackendNotAvailableError(
                f"kernel {kernel_id!r} asks for {need}, which no live node of the Ray "
                f"cluster offers (nodes offer: {nodes})"
            )

    @staticmethod
    def kill(actor: Any) -> None:
        """End an actor's process now."""
        import ray

        ray.kill(actor, no_restart=True)
