"""Handlers for the pool and notebook tests (imported inside Ray actors by module path)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

from ray_alpcrun.handler import Handler, SessionContext

# Sessions whose end hook ran in this process (each actor is its own process).
ENDED: list[str] = []


def echo(payload: bytes, shared: bytes | None) -> bytes:
    """Function form: payload + shared data; ``fail...`` payloads raise."""
    if payload.startswith(b"fail"):
        raise ValueError(f"asked to fail: {payload.decode()}")
    return payload + (b"|" + shared if shared is not None else b"")


def shared_type(payload: bytes, shared: bytes | None) -> bytes:
    """What type a function handler receives as shared data."""
    return type(shared).__name__.encode()


def shared_type_zero_copy(payload: bytes, shared: bytes | None) -> bytes:
    """Same, opted in to zero-copy shared data."""
    return type(shared).__name__.encode()


shared_type_zero_copy.zero_copy_shared = True  # type: ignore[attr-defined]


class Counter(Handler):
    """Class form: per-session counter, shared-data levels and every hook."""

    def decode_shared(self, payload: bytes) -> Any:
        return json.loads(bytes(payload))

    def on_session_start(self, session: SessionContext) -> None:
        session.state["count"] = 0
        session.state["updates"] = []

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        if payload == b"ended?":
            return json.dumps({"pid": os.getpid(), "ended": ENDED}).encode()
        if payload == b"boom":
            raise RuntimeError("boom requested")
        session.state["count"] += 1
        return json.dumps(
            {
                "task": payload.decode(),
                "session": session.id,
                "pid": os.getpid(),
                "count": session.state["count"],
                "level": session.update_level,
                "shared": session.shared,
                "updates": session.state["updates"],
            }
        ).encode()

    def on_shared_update(self, session: SessionContext, previous_level: int | None) -> None:
        session.state["updates"].append([previous_level, session.update_level])

    def on_session_end(self, session: SessionContext) -> None:
        ENDED.append(session.id)


class ZeroCopy(Handler):
    """Asks for shared data as a zero-copy view; answers the type it got."""

    zero_copy_shared = True

    def decode_shared(self, payload: bytes) -> Any:
        return payload

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        view = session.shared
        return f"{type(view).__name__}:{bytes(view[:3]).decode()}".encode()


class BrokenStart(Handler):
    """Its session start hook raises: nothing can run."""

    def on_session_start(self, session: SessionContext) -> None:
        raise RuntimeError("cannot start session")

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        return payload


class BrokenInit(Handler):
    """Cannot even be constructed."""

    def __init__(self) -> None:
        raise RuntimeError("no handler for you")


def gated(payload: bytes, shared: bytes | None) -> bytes:
    """``block`` waits at the named :class:`Gate` given as shared data (first time only)."""
    if payload == b"block":
        import ray

        assert shared is not None
        gate = ray.get_actor(shared.decode())
        ray.get(gate.enter.remote(ray.get_runtime_context().current_actor))
    return payload


def nap(payload: bytes, shared: bytes | None) -> bytes:
    """``nap:S`` sleeps S seconds (keeps an elastic pool busy), then echoes."""
    if payload.startswith(b"nap:"):
        time.sleep(float(payload[4:]))  # ok: the handler's work is to take this long
    return payload


def hang(payload: bytes, shared: bytes | None) -> bytes:
    """``hang`` never returns (until its actor is killed)."""
    if payload == b"hang":
        threading.Event().wait()
    return payload


def crash(payload: bytes, shared: bytes | None) -> bytes:
    """``crash`` takes its whole actor process down, every time."""
    if payload == b"crash":
        os._exit(3)
    return payload


class Gate:
    """Ray actor (async): holds the first caller of :meth:`enter` forever and tells the
    test who it is; later callers pass straight through. No sleeps anywhere."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.victim: Any = None
        self.count = 0

    async def enter(self, actor: Any) -> int:
        self.count += 1
        if self.count == 1:
            self.victim = actor
            self.entered.set()
            await asyncio.Event().wait()  # released only by the caller's death
        return self.count

    async def wait_entered(self) -> list[Any]:
        await self.entered.wait()
        return [self.victim]  # in a list: Ray would not resolve a handle anyway, but be explicit
