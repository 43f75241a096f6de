"""The pool actor class itself, without Ray: constructed as a plain object, its
methods called from threads as Ray and the direct path's socket thread call them."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from types import TracebackType

import pytest
from ray import cloudpickle

from ray_alpcrun.handler import Handler, SessionContext
from ray_alpcrun.pool.pool_actor import PoolActor, RunArgs, RunReply

pytestmark = pytest.mark.timeout(60)


class _WatchedLock:
    """The actor's lock, telling when a caller has to wait for it."""

    def __init__(self, inner: threading.RLock, contended: threading.Event) -> None:
        self._inner = inner
        self._contended = contended

    def __enter__(self) -> _WatchedLock:
        if not self._inner.acquire(blocking=False):
            self._contended.set()
            self._inner.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._inner.release()


class _Blocking(Handler):
    def __init__(self) -> None:
        self.log: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        # Set when a closer must wait for the lock, or (the bug) ran the end hook.
        self.progress = threading.Event()

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        self.log.append("process start")
        self.entered.set()
        self.release.wait(10)
        self.log.append("process end")
        return payload

    def on_session_end(self, session: SessionContext) -> None:
        self.log.append("session end")
        self.progress.set()


@pytest.fixture(autouse=True)
def _unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()  # PoolActor freezes the heap it starts with


def test_releasing_an_actor_waits_for_the_direct_frame_in_progress() -> None:
    # Issue 18 item 10: close_sessions (an ordinary call, Ray's thread) while a
    # direct frame runs the handler on the socket's thread.
    actor = PoolActor(cloudpickle.dumps(_Blocking), max_sessions=4)
    runtime = actor._runtime
    assert runtime is not None
    handler = runtime.handler
    assert isinstance(handler, _Blocking)
    actor._lock = _WatchedLock(actor._lock, handler.progress)  # type: ignore[assignment]
    replies: list[list[RunReply | None]] = []
    closed: list[int] = []
    frame: list[RunArgs] = [("s1", [b"x"], None, ())]
    runner = threading.Thread(target=lambda: replies.append(actor._run_direct(frame)))
    runner.start()
    assert handler.entered.wait(10)
    closer = threading.Thread(target=lambda: closed.append(actor.close_sessions()))
    closer.start()
    try:
        assert handler.progress.wait(10)
    finally:
        handler.release.set()
        runner.join(10)
        closer.join(10)
    assert handler.log == ["process start", "process end", "session end"]
    assert closed == [1]
    [[reply]] = replies
    assert isinstance(reply, tuple) and reply[0] == [(b"x", None)]
