"""Pools on the fast data paths (``direct``, ``compiled``) for the integration tests."""

from __future__ import annotations

import asyncio
from typing import Any

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.pool.actor_pool import ActorPool
from ray_alpcrun.pool.compiled import CompiledBackend
from ray_alpcrun.pool.direct import DirectBackend


def config(path: str, **kwargs: Any) -> PoolConfig:
    kwargs.setdefault("num_actors", 2)
    kwargs.setdefault("min_chunk", 1)
    kwargs.setdefault("min_chunk_work_s", 0.0)
    return PoolConfig(data_path=path, **kwargs)


async def on_path(pool: ActorPool, session: str = "warm", **kw: Any) -> None:
    """Return once every live actor takes sub-batches on the pool's own path: a
    compiled graph comes up after warm-up batches (bounded); a socket at start."""
    backend = pool._backend
    members = pool._running().members
    if isinstance(backend, DirectBackend):
        assert len(members()) == pool.size and all(backend.direct(m.actor) for m in members())
        return
    assert isinstance(backend, CompiledBackend)
    for _ in range(400):
        if len(members()) == pool.size and all(backend.graph_ready(m.actor) for m in members()):
            return
        n = 2 * pool.size
        out = await pool.run(session, [b"w%d" % i for i in range(n)], **kw)
        assert all(error is None for _, error in out)
        await asyncio.sleep(0.01)  # ok: lets a pending build run between batches
    raise AssertionError("compiled graphs did not come up")


def sends(pool: ActorPool) -> int:
    """Graph executions or socket frames sent so far (each may carry several sub-batches)."""
    backend = pool._backend
    assert isinstance(backend, (CompiledBackend, DirectBackend))
    return backend.sends
