"""Which session an idle worker goes to, and which worker to preempt.

Pure functions over ``SessionState`` records, called by ``core`` whenever
something changed (work arrived, a worker became idle, a session closed).

Rules:

* A session wants another worker while it has queued batches, is below
  ``max_workers`` (a hard cap) and has fewer workers than outstanding batches
  (more workers than batches could not all be busy).
* An idle worker goes to the wanting session with the highest priority; among
  equal priorities, sessions below their ``min_workers`` hint first, then the
  one with the fewest workers (fairness), then the oldest.
* Preemption: when a session still wants workers and no idle worker is left,
  workers of *preemptible* sessions with a lower priority are unbound (lowest
  priority first, from the session with most workers), no more than the
  demand not already covered by workers being preempted.
* Rebalancing (fair share): a session with work but no worker at all takes one
  worker from a *preemptible* session of the same priority that holds at least
  two workers, so equal sessions share the workers instead of the first one
  keeping them all until it runs dry. A session that is not preemptible never
  gives a worker up (the docs: only ``preemptible`` lets others take workers).
"""

from __future__ import annotations

from collections.abc import Iterable

from ray_alpcrun.devserver.model import SessionState, Worker


def _rank(s: SessionState) -> tuple[int, int, int, float]:
    below_min = s.attributes.min_workers is not None and len(s.bound) < s.attributes.min_workers
    return (-s.priority, 0 if below_min else 1, len(s.bound), s.created_s)


def best_session(wanting: Iterable[SessionState]) -> SessionState | None:
    """The session the next idle worker should be bound to, or None."""
    return min(wanting, key=_rank, default=None)


def demand(s: SessionState) -> int:
    """How many more workers ``s`` could keep busy right now."""
    if s.tasks.batches == 0:
        return 0
    want = s.outstanding_batches - len(s.bound)
    cap = s.attributes.max_workers
    if cap is not None:
        want = min(want, cap - len(s.bound))
    return max(want, 0)


def preemption_victims(
    needy: SessionState, sessions: Iterable[SessionState], count: int
) -> list[Worker]:
    """Up to ``count`` workers bound to preemptible sessions of lower priority."""
    if count <= 0:
        return []
    donors = [
        s for s in sessions if s.attributes.preemptible and s.priority < needy.priority and s.bound
    ]
    # Lowest priority first; among equals, take from the session with most workers.
    donors.sort(key=lambda s: (s.priority, -len(s.bound)))
    victims: list[Worker] = []
    for s in donors:
        for worker in reversed(list(s.bound.values())):  # newest binding first
            victims.append(worker)
            if len(victims) == count:
                return victims
    return victims


def rebalance_donor(needy: SessionState, sessions: Iterable[SessionState]) -> SessionState | None:
    """The equal-priority preemptible session that should give ``needy`` (which has
    work and no worker) one of its workers: the one holding the most, if it holds
    two or more."""
    if needy.bound:
        return None
    donors = [
        s
        for s in sessions
        if s.attributes.preemptible and s.priority == needy.priority and len(s.bound) >= 2
    ]
    return max(donors, key=lambda s: len(s.bound), default=None)
