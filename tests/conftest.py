"""Shared fixtures. Ray is started once per test session, with small resources."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import grpc.aio

    from ray_alpcrun.config import DevServerConfig
    from ray_alpcrun.devserver import LocalServices
    from tests.support.devserver_kit import FakeClock


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """A local Ray instance shared by every test that needs one."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            address="local",  # its own, not a cluster `ray start` left on the machine
            num_cpus=8,  # logical slots: the box has 2 cores, actors mostly wait
            num_gpus=0,
            object_store_memory=256 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def services(ray_session: Any) -> Iterator[Any]:
    """Local ALPCRUN.CH services shared by the bridge tests (Ray is up first:
    starting Ray after gRPC prints fork warnings)."""
    from ray_alpcrun.config import DevServerConfig
    from ray_alpcrun.devserver import LocalServices

    with LocalServices(
        DevServerConfig(queue_port=0, central_cache_port=0, node_cache_port=0)
    ) as svc:
        yield svc


@pytest.fixture
def bridge(services: Any, ray_session: Any) -> Iterator[Any]:
    """Factory: ``bridge(handler, actors=2, **BridgeConfig fields)`` starts a bridge
    on ``services``, waits until it is registered, and always stops it."""
    from ray_alpcrun.bridge.launch import BridgeHandle, start_bridge
    from tests.support.bridge_support import bridge_config

    started: list[BridgeHandle] = []

    def start(handler: str, actors: int = 2, **kw: Any) -> BridgeHandle:
        handle = start_bridge(bridge_config(services, handler, actors, **kw))
        started.append(handle)
        handle.wait_ready(60)
        return handle

    yield start
    for handle in started:
        ray_session.get(handle.stop(drain=False), timeout=60)
        ray_session.get(handle.run_ref, timeout=60)


@pytest.fixture
def devserver() -> Iterator[Any]:
    """Fresh local ALPCRUN.CH services (queue manager, central and node cache) on free
    ports, in a background thread; no Ray. ``devserver.service_config()`` tells a
    client or worker how to reach them."""
    from ray_alpcrun.devserver import LocalServices

    with LocalServices() as svc:
        yield svc


@pytest.fixture
def clock() -> FakeClock:
    """The fake monotonic clock ``svc`` runs on: it moves only on ``clock.advance``."""
    from tests.support.devserver_kit import FakeClock

    return FakeClock()


@pytest.fixture
def devserver_config() -> DevServerConfig:
    """What ``svc`` is started with: free ports, defaults otherwise. A test module
    that needs other settings overrides this fixture."""
    from tests.support.devserver_kit import free_config

    return free_config()


@pytest.fixture
async def svc(clock: FakeClock, devserver_config: DevServerConfig) -> AsyncIterator[LocalServices]:
    """Fresh local ALPCRUN.CH services built from ``devserver_config``, on the fake
    ``clock``, in the test's own event loop; no Ray."""
    from ray_alpcrun.devserver import LocalServices

    async with LocalServices(devserver_config, clock=clock) as services:
        yield services


@pytest.fixture
async def channel(svc: LocalServices) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to ``svc``'s queue manager, closed after the test."""
    from ray_alpcrun import transport

    ch = transport.open_channel(svc.queue_address)
    yield ch
    await ch.close(None)
