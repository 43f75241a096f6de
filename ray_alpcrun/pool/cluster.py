"""What the Ray cluster can ever hold, as far as Ray tells it.

The pool must not fail because the cluster is still growing (an autoscaling
cluster may start with no GPU node at all), yet it should fail at once when a
request can never fit. Three cases, by what Ray tells:

* ``autoscaler``: the autoscaler published its node types (GCS cluster
  config). Fail when no node type (nor live node) offers the actor's shape,
  or when ``min_actors`` is more than all node types at their maximum hold.
* ``autoscaling``: an autoscaler runs (v1: its status names node types; v2:
  the GCS flag) but its node types are not published. Nothing can be ruled
  out; actors wait.
* ``static``: no autoscaler. The live nodes are all there is: ``min_actors``
  must fit on them now (with ``min_actors`` 0 the pool waits for nodes that
  join by hand).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ray_alpcrun.errors import ConfigError
from ray_alpcrun.pool.scaling import NodeType, actors_per_node, cluster_capacity

log = logging.getLogger(__name__)

_AUTOSCALING_STATUS_KEY = "__autoscaling_status"  # written by Ray's v1 autoscaler monitor


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The node types Ray tells of, and where that came from (see module doc)."""

    source: str  # "autoscaler" | "autoscaling" | "static"
    types: list[NodeType] = field(default_factory=list)
    live: list[NodeType] = field(default_factory=list)


def read_cluster() -> ClusterView:
    """Ask Ray (initialised) what nodes there are and which the autoscaler can add."""
    import ray

    live = [
        NodeType(str(n.get("NodeID", "")), dict(n.get("Resources", {})), 1)
        for n in ray.nodes()
        if n.get("Alive")
    ]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as exc:  # private API: absent or changed in this Ray
        log.debug("no cluster config from the GCS: %s", exc)
        config = None
    if config is not None and len(config.node_group_configs) > 0:
        types = [
            NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
            for g in config.node_group_configs
        ]
        return ClusterView("autoscaler", types, live)
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        # Ray's autoscaler v2 says so in the GCS; v1 writes a status with its node types.
        v2 = _internal_kv_get(
            ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY,
            namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE,
        )
        raw = _internal_kv_get(_AUTOSCALING_STATUS_KEY)
        autoscaling = v2 == b"1" or (raw is not None and _has_autoscaler(json.loads(raw)))
    except Exception as exc:
        log.debug("cannot read the autoscaler status: %s", exc)
        autoscaling = False
    return ClusterView("autoscaling" if autoscaling else "static", [], live)


def _has_autoscaler(status: dict[str, Any]) -> bool:
    """True when the monitor's status comes from an autoscaler with node types.

    A cluster started without ``--autoscaling-config`` has a read-only monitor:
    it reports every live node as a node type of its own, named ``node_<id>``.
    """
    report = status.get("autoscaler_report") or {}
    mapping: dict[str, str] = report.get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


def shape_text(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU + {gpus:g} GPU" if gpus else f"{cpus:g} CPU"


def check_request(view: ClusterView, lowest: int, highest: int, cpus: float, gpus: float) -> int:
    """Raise :class:`ConfigError` when ``lowest`` actors of that shape can never run;
    return how many fit on the live nodes now (``1 << 30`` for no limit)."""
    if gpus > 1 and abs(gpus - round(gpus)) > 1e-9:
        raise ConfigError(
            f"--gpus-per-actor {gpus:g}: Ray only shares a GPU for requests below 1; "
            "above 1 it must be a whole number"
        )
    now = cluster_capacity(view.live, cpus, gpus)
    now = 1 << 30 if now is None else now
    shape = shape_text(cpus, gpus)
    if view.source != "autoscaler":
        return now
    offering = [t.name for t in view.types if actors_per_node(t.resources, cpus, gpus) > 0]
    if not offering and now == 0:
        kinds = "; ".join(
            f"{t.name}: {', '.join(f'{v:g} {k}' for k, v in sorted(t.resources.items()))}"
            for t in view.types
        )
        raise ConfigError(
            f"no node type of this Ray cluster offers an actor's {shape} ({kinds}); "
            "lower --gpus-per-actor/--cpus-per-actor or add a node type that has it"
        )
    most = cluster_capacity(view.types, cpus, gpus)
    if most is not None:
        most = max(most, now)
        if lowest > most:
            raise ConfigError(
                f"--min-actors {lowest} x {shape} is more than this cluster can ever hold: "
                f"at most {most} actor(s) on its node types at their max_workers "
                f"({', '.join(offering)})"
            )
        if highest > most:
            log.warning(
                "--max-actors %d is more than the cluster can ever hold (%d); "
                "the pool stops growing there",
                highest,
                most,
            )
    return now
