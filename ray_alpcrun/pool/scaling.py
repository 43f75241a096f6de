"""How many pool actors and logical workers to keep: pure functions, no Ray.

The elastic pool (``--min-actors``/``--max-actors``) measures its load in
**batches**: the batches the bridge holds from the queue manager, in flight on
an actor or waiting for one. It wants ``ceil(batches / target)`` actors
(``target`` = ``--target-batches-per-actor``, default 1), within the bounds:

* more wanted than live + pending: ask for the difference at once. An actor
  that Ray cannot place yet stays *pending*; pending actors are exactly the
  demand Ray's autoscaler adds nodes for.
* fewer wanted: once that has held for ``--downscale-delay`` seconds, give up
  pending actors first, then idle ones (nothing in flight); a busy actor is
  never released, it goes on a later tick once idle.

Logical workers (``--slots auto``) follow the pool: one per live or pending
actor, plus one while the pool may still grow, so that the queue manager can
hand the bridge more work than it has actors for -- that surplus is what makes
the pool grow. At least one is always registered, even with zero actors, so
that demand can reach the bridge at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

_EPS = 1e-9


def desired_actors(batches: int, target_per_actor: float, lowest: int, highest: int) -> int:
    """Actors wanted for ``batches`` batches at ``target_per_actor`` each, within bounds."""
    want = math.ceil(batches / target_per_actor - _EPS) if batches > 0 else 0
    return max(lowest, min(highest, want))


def target_slots(live: int, pending: int, highest: int, per_actor: int = 1) -> int:
    """Logical workers to register for a pool of ``live`` + ``pending`` actors (see module doc)."""
    actors = live + pending
    headroom = 1 if actors < highest else 0
    return max(1, per_actor * actors + headroom)


def actors_per_node(resources: Mapping[str, float], cpus: float, gpus: float) -> int:
    """How many actors of ``cpus`` CPU and ``gpus`` GPU one node of ``resources`` holds.

    Ray places a fractional GPU request (< 1) on one GPU, so with 0.4 GPU per
    actor a GPU holds two actors, not two and a half.
    """
    counts: list[int] = []
    if cpus > 0:
        counts.append(int(float(resources.get("CPU", 0.0)) / cpus + _EPS))
    if gpus > 0:
        node_gpus = float(resources.get("GPU", 0.0))
        if gpus < 1:
            counts.append(int(node_gpus + _EPS) * int(1 / gpus + _EPS))
        else:
            counts.append(int(node_gpus / gpus + _EPS))
    return min(counts) if counts else 1 << 30


@dataclass(frozen=True, slots=True)
class NodeType:
    """A kind of node the cluster has or can add: its resources and how many at most."""

    name: str
    resources: Mapping[str, float]
    max_count: int  # -1: no limit


def cluster_capacity(types: list[NodeType], cpus: float, gpus: float) -> int | None:
    """Most actors of that shape the cluster can ever hold; None for no limit."""
    total = 0
    for t in types:
        per = actors_per_node(t.resources, cpus, gpus)
        if per <= 0 or t.max_count == 0:
            continue
        if t.max_count < 0 or per >= 1 << 30:
            return None
        total += per * t.max_count
    return total


@dataclass(frozen=True, slots=True)
class Decision:
    """What the pool does now: start ``start`` actors, release up to ``release``."""

    target: int
    start: int = 0
    release: int = 0
    reason: str = ""


class Scaler:
    """Turns load samples into decisions, holding scale-down for ``downscale_delay_s``."""

    def __init__(
        self, lowest: int, highest: int, target_per_actor: float, downscale_delay_s: float
    ) -> None:
        self.lowest, self.highest = lowest, highest
        self.target_per_actor = target_per_actor
        self.downscale_delay_s = downscale_delay_s
        self._below_since: float | None = None

    def decide(self, batches: int, live: int, pending: int, now: float) -> Decision:
        want = desired_actors(batches, self.target_per_actor, self.lowest, self.highest)
        have = live + pending
        if want > have:
            self._below_since = None
            if have < self.lowest:
                why = f"below --min-actors {self.lowest}"
            else:
                why = (
                    f"{batches} batch(es) for {have} actor(s) "
                    f"(target {self.target_per_actor:g} per actor)"
                )
            return Decision(want, start=want - have, reason=why)
        if want < have:
            if self._below_since is None:
                self._below_since = now
            waited = now - self._below_since
            if waited + _EPS >= self.downscale_delay_s:
                why = (
                    f"{batches} batch(es) need {want} of {have} actor(s) "
                    f"for {waited:.1f} s (downscale delay {self.downscale_delay_s:g} s)"
                )
                return Decision(want, release=have - want, reason=why)
            return Decision(have)
        self._below_since = None
        return Decision(want)
