"""Session attributes: validation, server defaults and partial updates.

Decisions (the docs are silent or ambiguous):

* CreateSession without ``attributes`` gets every default (priority 5).
  With ``attributes``, ``priority`` is taken as sent (0 is a valid priority).
* ``idle_timeout`` unset or zero means the default, 60 s.
  ``max_inflight_batches_per_worker`` 0 means the default, 10.
* ``max_workers`` unset means no cap; an explicit 0 is rejected (a session that
  can never get a worker is a mistake). ``min_workers`` above ``max_workers``
  is rejected.
* UpdateSession changes only what the request says: ``min_workers``,
  ``max_workers`` and ``idle_timeout`` when present; ``priority``,
  ``max_inflight_batches_per_worker`` and ``tags`` when non-zero / non-empty;
  ``preemptible`` and ``cleanup_on_client_exit`` when true (proto3 cannot tell
  an unset bool from false, so update can switch them on, never off);
  ``client_id`` is fixed at creation.
"""

from __future__ import annotations

import dataclasses
import secrets

from ray_alpcrun.devserver.errors import Rejected
from ray_alpcrun.types import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_PRIORITY,
    SessionAttributes,
)

MAX_PRIORITY = 10


def _check(a: SessionAttributes) -> SessionAttributes:
    if not 0 <= a.priority <= MAX_PRIORITY:
        raise Rejected("INVALID_ARGUMENT", f"priority must be 0..{MAX_PRIORITY}, got {a.priority}")
    if a.max_workers is not None and a.max_workers < 1:
        raise Rejected(
            "INVALID_ARGUMENT", "max_workers must be at least 1 (leave it unset for no cap)"
        )
    if a.min_workers is not None and a.max_workers is not None and a.min_workers > a.max_workers:
        raise Rejected(
            "INVALID_ARGUMENT",
            f"min_workers ({a.min_workers}) exceeds max_workers ({a.max_workers})",
        )
    if a.idle_timeout_s is not None and a.idle_timeout_s < 0:
        raise Rejected("INVALID_ARGUMENT", "idle_timeout must not be negative")
    return a


def new_attributes(requested: SessionAttributes | None) -> SessionAttributes:
    """The attributes of a new session: validated, defaults filled, client id set."""
    a = requested if requested is not None else SessionAttributes(priority=DEFAULT_PRIORITY)
    return _check(
        dataclasses.replace(
            a,
            client_id=a.client_id or f"client-{secrets.token_hex(8)}",
            idle_timeout_s=a.idle_timeout_s or DEFAULT_IDLE_TIMEOUT_S,
            max_inflight_batches_per_worker=a.max_inflight_batches_per_worker
            or DEFAULT_MAX_INFLIGHT,
        )
    )


def updated_attributes(
    current: SessionAttributes, change: SessionAttributes | None
) -> SessionAttributes:
    """``current`` with the fields ``change`` carries (see the module docstring)."""
    if change is None:
        return current
    c = change
    return _check(
        dataclasses.replace(
            current,
            priority=c.priority or current.priority,
            min_workers=c.min_workers if c.min_workers is not None else current.min_workers,
            max_workers=c.max_workers if c.max_workers is not None else current.max_workers,
            idle_timeout_s=c.idle_timeout_s or current.idle_timeout_s,
            preemptible=c.preemptible or current.preemptible,
            cleanup_on_client_exit=c.cleanup_on_client_exit or current.cleanup_on_client_exit,
            max_inflight_batches_per_worker=c.max_inflight_batches_per_worker
            or current.max_inflight_batches_per_worker,
            tags=c.tags or current.tags,
        )
    )
