"""Pools on each data path (``direct``, ``calls``) for the integration tests."""

from __future__ import annotations

from typing import Any

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.pool.actor_pool import ActorPool
from ray_alpcrun.pool.backend import RayBackend
from ray_alpcrun.pool.direct import DirectBackend


def config(path: str, **kwargs: Any) -> PoolConfig:
    kwargs.setdefault("num_actors", 2)
    kwargs.setdefault("min_chunk", 1)
    kwargs.setdefault("min_chunk_work_s", 0.0)
    return PoolConfig(data_path=path, **kwargs)


async def on_path(pool: ActorPool, session: str = "warm", **kw: Any) -> None:
    """Check that every live actor takes sub-batches on the pool's own path (a
    socket from its start on the direct path; ordinary calls always on ``calls``)."""
    backend, membership = pool._backend, pool._membership
    assert membership is not None
    members = membership.members
    assert len(members()) == pool.size
    if isinstance(backend, DirectBackend):
        assert all(backend.direct(m.actor) for m in members())
    else:
        assert isinstance(backend, RayBackend)


def sends(pool: ActorPool) -> int:
    """Socket frames or Ray calls sent so far (each may carry several sub-batches)."""
    backend = pool._backend
    assert isinstance(backend, (RayBackend, DirectBackend))
    return backend.sends
