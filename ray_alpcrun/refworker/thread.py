"""Running a :class:`ReferenceWorker` in a background thread (tests, notebooks)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

from ray_alpcrun.handler import HandlerSpec
from ray_alpcrun.refworker.worker import ReferenceWorker, ReferenceWorkerConfig

GRPC_SETTLE_S = 0.05


class WorkerThread:
    """A reference worker on its own event loop in a daemon thread.

    ``stop()`` is graceful (answer the batches in hand, half-close, return);
    ``kill()`` is abrupt: streams are cancelled without answering, as if the
    process had died, so the queue manager must re-deliver its batches.
    """

    def __init__(self, worker: ReferenceWorker, name: str = "alpcrun-refworker") -> None:
        self.worker = worker
        self._loop = asyncio.new_event_loop()
        self._done: Future[None] = Future()
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> WorkerThread:
        self._thread.start()
        self._started.wait()
        return self

    @property
    def worker_id(self) -> str | None:
        return self.worker.worker_id

    def wait_registered(self, timeout_s: float = 10.0) -> str:
        """Block until the worker registered; its worker id. Raises its failure if it died."""
        if not self.worker.registered.wait(timeout_s):
            if self._done.done():
                self._done.result()
            raise TimeoutError(f"reference worker did not register within {timeout_s:g} s")
        assert self.worker.worker_id is not None
        return self.worker.worker_id

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful stop; re-raises what ended the worker, if anything did."""
        if not self._done.done():
            self._loop.call_soon_threadsafe(self.worker.stop)
        self.join(timeout_s)

    def kill(self, timeout_s: float = 30.0) -> None:
        """Abrupt stop, like a crash: cancel everything, answer nothing."""
        if not self._done.done() and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout_s)

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("reference worker thread did not end in time")
        self._done.result()

    def __enter__(self) -> WorkerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self._thread.is_alive():
            self.stop()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._task = self._loop.create_task(self.worker.run())
            self._started.set()
            self._loop.run_until_complete(self._task)
            self._done.set_result(None)
        except asyncio.CancelledError:
            self._done.set_result(None)  # killed on purpose
        except BaseException as exc:
            self._done.set_exception(exc)
        finally:
            self._started.set()
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            # grpc completes the operations of cancelled calls a moment later, through
            # this loop; closing it at once makes grpc log "Event loop is closed".
            self._loop.run_until_complete(asyncio.sleep(GRPC_SETTLE_S))
            self._loop.close()


def start_in_thread(
    config: ReferenceWorkerConfig, handler: HandlerSpec, name: str = "alpcrun-refworker"
) -> WorkerThread:
    """Start a reference worker in a background thread and return its handle."""
    return WorkerThread(ReferenceWorker(config, handler), name=name).start()
