"""The bridge as a Ray actor: the gRPC worker (``worker.py``) in front of an
:class:`~ray_alpcrun.pool.ActorPool`.

The actor asks for no CPU (``num_cpus=0``) so it never starves the pool, and
is async: its event loop carries the gRPC streams while the pool's actors compute.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray_alpcrun import errors
from ray_alpcrun.bridge.worker import BridgeWorker, WorkerSettings
from ray_alpcrun.config import PoolConfig
from ray_alpcrun.handler import HandlerSpec
from ray_alpcrun.logs import fields, setup_logging
from ray_alpcrun.runtime import Outcome

log = logging.getLogger(__name__)


class PoolProcessor:
    """Adapts the actor pool to the bridge's ``Processor`` protocol."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def share(self, session_id: str, level: int | None, payload: bytes) -> Any:
        return self.pool.put_shared(session_id, level, payload)

    async def process(
        self, session_id: str, payloads: list[bytes], shared: Any | None
    ) -> list[Outcome]:
        outcomes: list[Outcome] = await self.pool.run(session_id, payloads, shared=shared)
        return outcomes

    async def end_session(self, session_id: str) -> None:
        await self.pool.end_session(session_id)


class Bridge:
    """Runs inside the Ray actor (see :func:`bridge_actor_class`)."""

    def __init__(
        self,
        handler: HandlerSpec,
        pool_config: PoolConfig,
        settings: WorkerSettings,
        log_level: str = "info",
        log_json: bool = False,
        health_port: int | None = None,
    ) -> None:
        setup_logging(log_level, log_json)
        self.handler = handler
        self.pool_config = pool_config
        self.settings = settings
        self.health_port = health_port
        self.pool: Any = None
        self.worker: BridgeWorker | None = None
        self._started = asyncio.Event()
        self._stop_requested = False

    async def run(self) -> tuple[int, str]:
        """Serve until stopped; returns (exit code, reason) — never raises for config errors."""
        from ray_alpcrun.pool import ActorPool

        try:
            self.pool = ActorPool(self.handler, self.pool_config)
            await self.pool.start()
            self.worker = BridgeWorker(self.settings, PoolProcessor(self.pool))
            self._started.set()
            log.info(
                "bridge serving",
                extra=fields(
                    queue=self.settings.queue_address,
                    cache=self.settings.cache_address,
                    slots=self.settings.slots,
                    actors=self.pool_config.num_actors,
                    package=self.settings.proto_package or "(none)",
                ),
            )
            if self._stop_requested:
                return errors.EXIT_OK, ""
            await self.worker.run()
            return errors.EXIT_OK, ""
        except errors.FatalError as exc:
            return exc.exit_code, exc.reason
        except errors.HandlerError as exc:
            return errors.EXIT_HANDLER, f"handler: {exc}"
        except errors.ConfigError as exc:
            return errors.EXIT_CONFIG, str(exc)
        finally:
            self._started.set()
            if self.pool is not None:
                await self.pool.close()

    async def stop(self, drain: bool = True) -> None:
        self._stop_requested = True
        await self._started.wait()
        if self.worker is not None:
            await self.worker.stop(drain=drain)

    async def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """True once every slot is registered with the queue manager."""
        await asyncio.wait_for(self._started.wait(), timeout_s)
        if self.worker is None:
            return False
        await self.worker.wait_registered(timeout_s)
        return True

    async def status(self) -> dict[str, Any]:
        w = self.worker
        out: dict[str, Any] = {"started": self._started.is_set(), "ready": bool(w and w.ready)}
        if w is not None:
            s = w.stats
            out.update(
                slots=[
                    {
                        "worker_id": slot.worker_id,
                        "registered": slot.registered.is_set(),
                        "session": slot.session.session_id if slot.session else None,
                        "in_flight": slot.session.in_flight if slot.session else 0,
                    }
                    for slot in w.slots
                ],
                sessions=w.bound_sessions,
                tasks_ok=s.tasks_ok,
                tasks_failed=s.tasks_failed,
                batches_done=s.batches_done,
                batches_dead=s.batches_dead,
                batches_in_flight=s.batches_in_flight,
                results_dropped=s.results_dropped,
                shared_fetches=w.link.shared.fetches if hasattr(w, "link") else 0,
                reconnects=w.reconnects,
            )
        if self.pool is not None:
            out["actor_restarts"] = self.pool.restarts
            out["actors"] = await self.pool.status()
        return out


def bridge_actor_class() -> Any:
    """The Ray actor class for :class:`Bridge` (imports Ray on first use)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0, max_concurrency=1000)(Bridge)
