"""Helpers shared by the tests that run a bridge (fixtures live in conftest.py)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.client import AsyncClient, Client, TaskResult
from ray_alpcrun.config import BridgeConfig, PoolConfig, ServiceConfig


def bridge_config(svc: Any, handler: str, actors: int = 2, **kw: Any) -> BridgeConfig:
    services = ServiceConfig(
        queue_address=svc.queue_address,
        cache_address=svc.node_cache_address,
        central_cache_address=svc.central_cache_address,
        api_key=kw.pop("api_key", svc.api_key),
        proto_package=svc.proto_package,
    )
    # The data path is PoolConfig's default unless a test asks for one.
    path = {"data_path": kw.pop("data_path")} if "data_path" in kw else {}
    pool = PoolConfig(
        num_actors=actors,
        cpus_per_actor=kw.pop("cpus_per_actor", 0.5),
        min_chunk=kw.pop("min_chunk", 1),
        task_timeout_s=kw.pop("task_timeout_s", None),
        no_actor_grace_s=kw.pop("no_actor_grace_s", 60.0),
        **path,
    )
    return BridgeConfig(services=services, handler=handler, pool=pool, **kw)


def worker_settings(svc: Any, **kw: Any) -> WorkerSettings:
    """A one-slot ``BridgeWorker``'s settings for the services ``svc`` (node "n", pod "p")."""
    return WorkerSettings(
        queue_address=svc.queue_address,
        cache_address=svc.node_cache_address,
        api_key=svc.api_key,
        proto_package=svc.proto_package,
        node="n",
        pod="p",
        slots=1,
        **kw,
    )


def async_client_for(svc: Any) -> AsyncClient:
    return AsyncClient(
        svc.queue_address,
        svc.central_cache_address,
        api_key=svc.api_key,
        proto_package=svc.proto_package,
    )


def client_for(svc: Any) -> Client:
    return Client(
        queue=svc.queue_address,
        central_cache=svc.central_cache_address,
        api_key=svc.api_key,
        proto_package=svc.proto_package,
    )


def ray_get(ref: Any, timeout_s: float = 60.0) -> Any:
    import ray

    return ray.get(ref, timeout=timeout_s)


def assert_exactly_once(results: list[TaskResult], n: int) -> None:
    counts = Counter(r.index for r in results)
    missing = sorted(set(range(n)) - set(counts))
    assert not missing, f"{len(missing)} tasks lost, e.g. {missing[:5]}; got {len(results)}"
    assert sorted(counts) == list(range(n)), "unexpected task indices"
    assert max(counts.values()) == 1, "a task was answered twice"
