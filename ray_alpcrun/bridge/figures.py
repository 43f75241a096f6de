"""Every metric on the bridge's ``/metrics``: its name, its help text and where its
value comes from (read when scraped). ``docs/metrics.md`` lists them for operators
and ``deploy/grafana/ray_alpcrun.json`` draws them; ``tests/integration/test_dashboard.py``
checks the two against each other through a real Prometheus.

Decisions:

* The series without labels are the deployment's: the coordinator's own figures
  plus what every node bridge reported at its last poll (``nodes.POLL_S``).
* Per bridge, one label, ``node``: the node name its logical workers register
  under. The coordinator's own figures are one of them, so a single bridge
  (``--bridges one``, or one node) has its per-node series too. Per logical
  worker, ``node`` and ``slot``: the worker's position among its bridge's
  logical workers (0..K-1, bounded by ``--slots`` or the node's actors), never
  the worker id the queue manager hands out at each registration. GPU memory:
  ``actor``, the pool index (bounded by ``--max-actors``). No session id, task
  or batch is ever a label.
* Shared-data update levels are a session's own integers, without bound, so no
  label carries them: the levels handed to the actors and the actors' decodes
  are counted (their ratio is the decodes per level: one per actor that ran
  the session), and a gauge shows the highest level held.
* The actors' decode counts live in the actors: a background loop of the
  coordinator reads them (``background._read_actor_counters``), so a scrape of
  a CPU pool never waits for an actor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ray_alpcrun.bridge.stats import BridgeMetrics, Labels

# The Bridge, untyped here: this module must not import the one that imports it.
Bridge = Any

# What a bridge counts outside its BridgeStats (a node bridge reports them in
# load()["stats"] beside STAT_FIELDS); summed into the deployment's series.
WORKER_FIELDS = (
    "shared_fetches",
    "shared_bytes",
    "shared_levels",
    "reconnects",
    "sessions_bound",
    "workers_bound",
)


def worker_figures(worker: Any) -> dict[str, int]:
    """The :data:`WORKER_FIELDS` of a ``BridgeWorker`` (zeros before it exists),
    and ``shared_level_max``."""
    if worker is None:
        return {**dict.fromkeys(WORKER_FIELDS, 0), "shared_level_max": 0}
    shared = worker.link.shared
    return {
        "shared_fetches": shared.fetches,
        "shared_bytes": shared.fetched_bytes,
        "shared_levels": shared.levels_shared,
        "reconnects": worker.reconnects,
        "sessions_bound": len(worker.bound_sessions),
        "workers_bound": sum(slot.session is not None for slot in worker.slots),
        "shared_level_max": shared.level_max,
    }


def slots_in_flight(worker: Any) -> list[int]:
    """Batches in flight on each logical worker, in the order of its slots."""
    if worker is None:
        return []
    return [slot.session.in_flight if slot.session is not None else 0 for slot in worker.slots]


class ActorTally:
    """A counter the pool's actors keep (``shared_decodes``), summed over every
    actor that ever reported it: an actor replaced or released keeps its share,
    so the sum never goes down. Bounded by the pool's indexes."""

    def __init__(self, field: str) -> None:
        self.field = field
        self._gone = 0
        self._seen: dict[Any, tuple[tuple[Any, Any], int]] = {}  # index -> (incarnation, value)

    def update(self, actors: Iterable[Mapping[str, Any]]) -> None:
        """Take one round of the pool's status (``pool.status()["actors"]``)."""
        present = set()
        for actor in actors:
            index = actor.get("actor")
            present.add(index)
            if "error" in actor or "pid" not in actor:
                continue  # no answer this round: keep what it said last
            incarnation = (actor.get("node_id"), actor["pid"])
            value = int(actor.get(self.field) or 0)
            last = self._seen.get(index)
            if last is not None and last[0] != incarnation:
                self._gone += last[1]  # replaced at the same index
            self._seen[index] = (incarnation, value)
        for index in self._seen.keys() - present:
            self._gone += self._seen.pop(index)[1]

    @property
    def total(self) -> int:
        return self._gone + sum(value for _, value in self._seen.values())


# (scale_status key, metric name, help) of the pool's gauges.
_SCALE_GAUGES = (
    ("pending", "alpcrun_pool_actors_pending", "pool actors requested and not yet placed"),
    ("target", "alpcrun_pool_actors_target", "pool actors the scaler wants now"),
    ("min_actors", "alpcrun_pool_actors_min", "lower bound of the pool (--min-actors)"),
    ("max_actors", "alpcrun_pool_actors_max", "upper bound of the pool (--max-actors)"),
    ("batches", "alpcrun_pool_batches", "batches held by the pool (running or waiting)"),
)

# (bridge entry key, metric name, help) of the per-bridge gauges and counters.
_BRIDGE_GAUGES = (
    ("registered", "alpcrun_node_bridge_workers_registered",
     "logical workers a bridge has registered, per node"),
    ("batches", "alpcrun_node_bridge_batches",
     "batches a bridge holds (running or waiting for an actor), per node"),
    ("ready", "alpcrun_node_bridge_ready", "1 while a bridge takes work, per node"),
)  # fmt: skip
_BRIDGE_COUNTERS = (
    ("tasks_ok", "alpcrun_node_bridge_tasks_processed_total",
     "tasks a bridge answered with a result, per node"),
    ("tasks_failed", "alpcrun_node_bridge_tasks_failed_total",
     "tasks a bridge answered with an error, per node"),
)  # fmt: skip


def make_metrics(bridge: Bridge) -> BridgeMetrics:
    """The bridge's registry: its stats, its logical workers, the pool, per node."""
    m = BridgeMetrics(bridge._stats)
    summed = _summed(bridge)
    for key, name, help_text in (
        ("shared_fetches", "alpcrun_shared_data_fetches_total",
         "GetSharedData calls to the node cache"),
        ("shared_bytes", "alpcrun_shared_data_bytes_total", "bytes of shared data fetched"),
        ("shared_levels", "alpcrun_shared_data_levels_total",
         "shared-data levels (per session) handed to the actors"),
        ("reconnects", "alpcrun_reconnects_total", "registrations retried after a failure"),
    ):  # fmt: skip
        m.counter(name, help_text, summed(key))
    m.counter(
        "alpcrun_shared_data_decodes_total",
        "shared data decoded by the pool's actors (decode_shared calls)",
        lambda: float(bridge.decodes.total),
    )
    m.gauge(
        "alpcrun_shared_data_level_max",
        "highest shared-data update level held for any session",
        lambda: float(max((b.get("shared_level_max", 0) for b in _bridges(bridge)), default=0)),
    )
    m.gauge("alpcrun_sessions_bound", "sessions bound now (summed over bridges)",
            summed("sessions_bound"))  # fmt: skip
    m.gauge("alpcrun_workers_bound", "logical workers bound to a session now",
            summed("workers_bound"))  # fmt: skip
    m.gauge(
        "alpcrun_workers_registered",
        "logical workers registered with the queue manager",
        lambda: float(sum(int(b.get("registered", 0)) for b in _bridges(bridge))),
    )
    # The elastic pool's figures (actors alive, pending and wanted, the bounds, decisions).
    m.gauge("alpcrun_pool_actors_alive", "pool actors alive",
            lambda: float(bridge.pool.live if bridge.pool else 0))  # fmt: skip
    for key, name, help_text in _SCALE_GAUGES:
        m.gauge(name, help_text, _of_scale(bridge, key))
    m.counter("alpcrun_pool_actors_requested_total", "actors asked for by scaling up",
              _of_scale(bridge, "requested"))  # fmt: skip
    m.counter("alpcrun_pool_actors_released_total",
              "actors released by scaling down (idle or still starting)",
              _of_scale(bridge, "released"))  # fmt: skip
    m.counter("alpcrun_pool_actors_released_under_load_total",
              "of those, released while the bridge held batches",
              _of_scale(bridge, "released_under_load"))  # fmt: skip
    m.counter(
        "alpcrun_actor_restarts_total",
        "pool actors replaced after dying or hanging",
        lambda: float(bridge.pool.restarts if bridge.pool else 0),
    )
    m.counter(
        "alpcrun_pool_actor_start_failures_total",
        "failed attempts to start a pool actor",
        lambda: float(bridge.pool.availability().start_failures if bridge.pool else 0),
    )
    for key, name, help_text in _BRIDGE_GAUGES:
        m.labelled_gauge(name, help_text, "node", _per_bridge(bridge, key))
    for key, name, help_text in _BRIDGE_COUNTERS:
        m.labelled_counter(name, help_text, "node", _per_node_count(bridge, key))
    m.labelled_gauge(
        "alpcrun_worker_batches_in_flight",
        "batches in flight on one logical worker",
        ("node", "slot"),
        lambda: _per_slot(bridge),
    )
    m.labelled_gauge(
        "alpcrun_gpu_memory_used_bytes",
        "GPU memory used, per GPU actor (NVML)",
        "actor",
        lambda: bridge._gpu_memory,
    )
    return m


def _own(bridge: Bridge) -> dict[str, Any]:
    """The coordinator's own figures, shaped as a node bridge reports its load."""
    worker, pool = bridge.worker, bridge.pool
    stats = worker.stats if worker is not None else bridge._idle_stats
    return {
        "node": bridge.settings.node,
        "registered": sum(s.registered.is_set() for s in worker.slots) if worker else 0,
        "batches": pool.scale_status()["batches"] if pool is not None else 0,
        "ready": bridge.ready_here,
        "tasks_ok": stats.tasks_ok,
        "tasks_failed": stats.tasks_failed,
        "slots_in_flight": slots_in_flight(worker),
        **worker_figures(worker),
    }


def _bridges(bridge: Bridge) -> list[dict[str, Any]]:
    """The coordinator's figures and every live node bridge's (as last polled).
    A node bridge that has not answered a poll yet has no figures, and no name:
    it is left out rather than labelled by its node's id for a moment."""
    nodes = bridge.nodes
    others = [] if nodes is None else [n for n in nodes.describe() if n["node"] and not n["dead"]]
    return [_own(bridge), *others]


def _summed(bridge: Bridge) -> Callable[[str], Callable[[], float]]:
    def of(key: str) -> Callable[[], float]:
        return lambda: float(sum(int(b.get(key) or 0) for b in _bridges(bridge)))

    return of


def _per_bridge(bridge: Bridge, key: str) -> Callable[[], list[tuple[str, float]]]:
    return lambda: [(str(b["node"]), float(b.get(key) or 0)) for b in _bridges(bridge)]


def _per_node_count(bridge: Bridge, key: str) -> Callable[[], list[tuple[str, float]]]:
    """A counter per node name: its live bridges' and those that ended there
    (a replaced node bridge's count is kept, so the series never goes back)."""

    def read() -> list[tuple[str, float]]:
        totals: dict[str, float] = {}
        ended = bridge.nodes.ended_counts() if bridge.nodes is not None else {}
        for node, counts in ended.items():
            totals[node] = float(counts.get(key, 0))
        for b in _bridges(bridge):
            totals[str(b["node"])] = totals.get(str(b["node"]), 0.0) + float(b.get(key) or 0)
        return sorted(totals.items())

    return read


def _per_slot(bridge: Bridge) -> list[tuple[Labels, float]]:
    return [
        ((str(b["node"]), str(slot)), float(in_flight))
        for b in _bridges(bridge)
        for slot, in_flight in enumerate(b.get("slots_in_flight") or [])
    ]


def _of_scale(bridge: Bridge, key: str) -> Callable[[], float]:
    """A figure of the pool's scaling state, read at scrape time."""
    return lambda: float(bridge.pool.scale_status()[key]) if bridge.pool is not None else 0.0
