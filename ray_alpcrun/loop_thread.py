"""A private event loop in a daemon thread, so blocking APIs (the sync client,
the notebook pool) work in scripts and inside Jupyter, where a loop already runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import TypeVar

T = TypeVar("T")


class LoopThread:
    """An event loop running forever in a daemon thread; ``run`` blocks on a coroutine."""

    def __init__(self, name: str, owner: str) -> None:
        self.owner = owner
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[object, None, T]) -> concurrent.futures.Future[T]:
        if threading.get_ident() == self._thread.ident:
            coro.close()
            raise RuntimeError(f"{self.owner} was called from its own event loop")
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError(f"{self.owner} is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[object, None, T]) -> T:
        """Run ``coro`` on the private loop and wait for it (from any other thread)."""
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: do not leave the coroutine running
            raise

    async def arun(self, coro: Coroutine[object, None, T]) -> T:
        """Await ``coro`` running on the private loop from another loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self, settle_s: float = 0.0) -> None:
        """Stop and close the loop; idempotent. ``settle_s`` lets grpc finish the
        operations of cancelled calls first (else it logs "Event loop is closed")."""
        if self.loop.is_closed():
            return
        if settle_s > 0:
            settle = asyncio.run_coroutine_threadsafe(asyncio.sleep(settle_s), self.loop)
            with contextlib.suppress(Exception):
                settle.result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
