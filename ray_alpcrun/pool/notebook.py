"""Run a handler on Ray from a notebook or a script, with no queue manager.

Same handler API, shared data and error semantics as the bridge::

    from ray_alpcrun.pool.notebook import RayPool

    with RayPool("ray_alpcrun.examples.monte_carlo.handler:price", actors=2, shared=params) as pool:
        results = pool.map(payloads)              # list[bytes]; TasksFailed if any task failed
        pool.set_shared(new_params)               # next update level: on_shared_update runs
        mixed = pool.map(payloads, return_errors=True)   # TaskFailed in place of failures
        results = await pool.amap(payloads)       # from async code

The pool is one session (``pool.session_id``): per-session handler state lives
as long as the pool. The async pool runs on a private event loop in a
background thread, so ``map`` also works where a loop is already running in the
main thread (Jupyter).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.errors import AlpcrunError, TaskFailed, TasksFailed
from ray_alpcrun.handler import HandlerSpec, import_object
from ray_alpcrun.loop_thread import LoopThread
from ray_alpcrun.pool.actor_pool import ActorPool
from ray_alpcrun.pool.pool_actor import SharedRef
from ray_alpcrun.progress import progress_bar
from ray_alpcrun.runtime import Outcome

__all__ = ["RayPool"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# With a progress bar a batch goes out in pieces, about this many per actor.
_PIECES_PER_ACTOR = 8
_END_SESSION_TIMEOUT_S = 10.0


class RayPool:
    """A handler on Ray actors, driven synchronously (``map``) or asynchronously (``amap``).

    ``handler`` is a ``module:object`` string, a function
    ``handle(payload, shared) -> bytes``, or a Handler class or instance.
    ``config`` overrides ``actors``, ``gpus_per_actor`` and ``task_timeout_s``.
    Ray is started with ``ray.init(**ray_init)`` unless already initialised.
    """

    def __init__(
        self,
        handler: HandlerSpec,
        actors: int = 2,
        shared: bytes | None = None,
        *,
        gpus_per_actor: float = 0.0,
        task_timeout_s: float | None = None,
        config: PoolConfig | None = None,
        tags: Sequence[str] = (),
        session_id: str | None = None,
        progress: bool = False,
        ray_init: Mapping[str, object] | None = None,
    ) -> None:
        self.config = config or PoolConfig(
            num_actors=actors, gpus_per_actor=gpus_per_actor, task_timeout_s=task_timeout_s
        )
        self.session_id = session_id or f"notebook-{uuid.uuid4().hex[:12]}"
        self.tags = tuple(tags)
        self.progress = progress
        self._handler = handler
        self._ray_init = dict(ray_init or {})
        self._pool: ActorPool | None = None
        self._loop: LoopThread | None = None
        self._level = 0
        self._initial_shared = shared
        self._shared: SharedRef | None = None

    @property
    def update_level(self) -> int | None:
        """The shared data's current update level (None without shared data)."""
        return self._level or None

    @property
    def restarts(self) -> int:
        """Actors replaced since start."""
        return self._pool.restarts if self._pool is not None else 0

    def start(self) -> RayPool:
        """Start Ray (if needed) and the actors. Idempotent; ``with`` calls it."""
        if self._pool is not None:
            return self
        if isinstance(self._handler, str):
            # A missing module (e.g. a handler module not on the path) fails
            # here, in a second, not after Ray has started.
            import_object(self._handler)
        self._init_ray()
        loop = LoopThread("ray-alpcrun-pool", "RayPool")
        pool = ActorPool(self._handler, self.config)
        try:
            loop.run(pool.start())
        except BaseException:
            loop.stop()
            raise
        self._loop, self._pool = loop, pool
        if self._initial_shared is not None:
            self.set_shared(self._initial_shared)
        return self

    def set_shared(self, data: bytes) -> int:
        """Publish new shared data at the next update level; returns that level.

        Actors decode it once each, on their next task, and run ``on_shared_update``.
        """
        pool = self._running()
        self._level += 1
        self._shared = pool.put_shared(self.session_id, self._level, data)
        return self._level

    @overload
    def map(
        self,
        payloads: Iterable[bytes],
        *,
        return_errors: Literal[False] = False,
        progress: bool | None = None,
    ) -> list[bytes]: ...

    @overload
    def map(
        self,
        payloads: Iterable[bytes],
        *,
        return_errors: Literal[True],
        progress: bool | None = None,
    ) -> list[bytes | TaskFailed]: ...

    def map(
        self,
        payloads: Iterable[bytes],
        *,
        return_errors: bool = False,
        progress: bool | None = None,
    ) -> list[bytes] | list[bytes | TaskFailed]:
        """Run every payload; results in order.

        A failed task raises :class:`TasksFailed` (naming each failure), or with
        ``return_errors=True`` appears as a :class:`TaskFailed` in its place.
        :class:`~ray_alpcrun.errors.SessionSetupError` if nothing could run.
        """
        self._running()
        assert self._loop is not None
        batch = list(payloads)
        outcomes = self._loop.run(self._run(batch, progress))
        return _results(outcomes, return_errors)

    @overload
    async def amap(
        self,
        payloads: Iterable[bytes],
        *,
        return_errors: Literal[False] = False,
        progress: bool | None = None,
    ) -> list[bytes]: ...

    @overload
    async def amap(
        self,
        payloads: Iterable[bytes],
        *,
        return_errors: Literal[True],
        progress: bool | None = None,
    ) -> list[bytes | TaskFailed]: ...

    async def amap(
        self,
        payloads: Iterable[bytes],
        *,
        return_errors: bool = False,
        progress: bool | None = None,
    ) -> list[bytes] | list[bytes | TaskFailed]:
        """The async twin of :meth:`map` (runs on the pool's loop; awaitable from any loop)."""
        self._running()
        assert self._loop is not None
        batch = list(payloads)
        outcomes = await self._loop.arun(self._run(batch, progress))
        return _results(outcomes, return_errors)

    def status(self) -> dict[str, Any]:
        """The pool's and each actor's counters."""
        pool = self._running()
        assert self._loop is not None
        status: dict[str, Any] = self._loop.run(pool.status())
        status.update(session_id=self.session_id, update_level=self.update_level)
        return status

    def close(self) -> None:
        """End the session (end hooks run) and stop the actors. Ray keeps running."""
        pool, loop = self._pool, self._loop
        self._pool, self._loop, self._shared = None, None, None
        if pool is None or loop is None:
            return
        try:
            loop.run(self._finish(pool))
        finally:
            loop.stop()

    def __enter__(self) -> RayPool:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> RayPool:
        # Ray wants its signal handlers from the main thread: init here; then wait
        # for the actors off the caller's loop.
        self._init_ray()
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # close() blocks on the private loop; keep the caller's loop free meanwhile.
        await asyncio.to_thread(self.close)

    def _init_ray(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(**self._ray_init)

    # -- on the private loop -----------------------------------------------

    async def _run(self, batch: list[bytes], progress: bool | None) -> list[Outcome]:
        pool = self._running()
        shared, tags = self._shared, self.tags
        show = self.progress if progress is None else progress
        if not (show and batch):
            return await pool.run(self.session_id, batch, shared=shared, tags=tags)
        bar = progress_bar(len(batch))  # a notebook widget or a terminal bar
        piece = max(1, math.ceil(len(batch) / (pool.size * _PIECES_PER_ACTOR)))

        async def part(chunk: list[bytes]) -> list[Outcome]:
            out = await pool.run(self.session_id, chunk, shared=shared, tags=tags)
            bar.update(len(chunk))
            return out

        try:
            parts = await asyncio.gather(
                *(part(batch[i : i + piece]) for i in range(0, len(batch), piece))
            )
        finally:
            bar.close()
        return [outcome for p in parts for outcome in p]

    async def _finish(self, pool: ActorPool) -> None:
        try:
            await asyncio.wait_for(pool.end_session(self.session_id), _END_SESSION_TIMEOUT_S)
        except (asyncio.TimeoutError, AlpcrunError) as exc:
            log.debug("session end hooks did not all run: %s", exc)  # actors stop next anyway
        finally:
            await pool.close()

    def _running(self) -> ActorPool:
        if self._pool is None:
            raise AlpcrunError("the RayPool is not started (use `with RayPool(...)` or .start())")
        return self._pool


def _results(outcomes: list[Outcome], return_errors: bool) -> list[Any]:
    if all(error is None for _, error in outcomes):
        return [result for result, _ in outcomes]
    results: list[bytes | TaskFailed] = []
    failures: list[TaskFailed] = []
    for index, (result, error) in enumerate(outcomes):
        if error is None and result is not None:
            results.append(result)
        else:
            failed = TaskFailed(str(index), error or "no result")
            failures.append(failed)
            results.append(failed)
    if failures and not return_errors:
        raise TasksFailed(failures, list(results))
    return results
