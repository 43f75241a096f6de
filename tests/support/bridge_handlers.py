"""Handlers used by the bridge end-to-end tests (imported inside Ray actors)."""

from __future__ import annotations

import json
import os

from ray_alpcrun.handler import Handler, SessionContext


def echo(payload: bytes, shared: bytes | None) -> bytes:
    """Function form: payload + shared data (if any)."""
    if payload.startswith(b"fail"):
        raise ValueError(f"asked to fail: {payload.decode()}")
    return payload + (b"|" + bytes(shared) if shared is not None else b"")


class Stateful(Handler):
    """Class form: proves per-session state, shared-data levels and the hooks."""

    def decode_shared(self, payload: bytes) -> dict[str, object]:
        decoded: dict[str, object] = json.loads(bytes(payload))
        return decoded

    def on_session_start(self, session: SessionContext) -> None:
        session.state["count"] = 0
        session.state["updates"] = []

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        if payload == b"boom":
            raise RuntimeError("boom requested")
        session.state["count"] += 1
        shared = session.shared or {}
        return json.dumps(
            {
                "task": payload.decode(),
                "session": session.id,
                "pid": os.getpid(),
                "count": session.state["count"],
                "level": session.update_level,
                "value": shared.get("value"),
                "updates": session.state["updates"],
            }
        ).encode()

    def on_shared_update(self, session: SessionContext, previous_level: int | None) -> None:
        session.state["updates"].append([previous_level, session.update_level])


class BrokenStart(Handler):
    """Its session start hook raises: every batch must come back dead."""

    def on_session_start(self, session: SessionContext) -> None:
        raise RuntimeError("cannot start session")

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        return payload


def crash_once(payload: bytes, shared: bytes | None) -> bytes:
    """Kills its own actor process the first time it sees its marker file missing."""
    marker, _, index = payload.decode().partition("|")
    if index == "120" and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("crashed")
        os._exit(1)
    return payload


def slow(payload: bytes, shared: bytes | None) -> bytes:
    """About 10 ms per task, so batches are in flight when the test acts."""
    import time

    time.sleep(0.01)  # ok: simulated work inside a handler, not a test wait
    return payload


def gated(payload: bytes, shared: bytes | None) -> bytes:
    """``gate:<dir>:<text>`` marks ``<dir>/started`` and waits for ``<dir>/open``
    (bounded), so a test can hold a batch in flight; ``big:N`` returns N bytes;
    anything else is ``echo``."""
    if payload.startswith(b"gate:"):
        import time
        from pathlib import Path

        _, folder, text = payload.decode().split(":", 2)
        Path(folder, "started").touch()
        deadline = time.monotonic() + 60.0
        while not Path(folder, "open").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # ok: polls a file the test process creates (bounded)
        return text.encode()
    if payload.startswith(b"big:"):
        return b"x" * int(payload[4:])
    return echo(payload, shared)


def slower(payload: bytes, shared: bytes | None) -> bytes:
    """About 50 ms per task: a continuous feed keeps many batches queued."""
    import time

    time.sleep(0.05)  # ok: simulated work inside a handler, not a test wait
    return payload


class EndMarker(Handler):
    """``on_session_end`` leaves a file named after the session in the directory
    the first payload names, so a test sees that (and when) the hook ran."""

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        session.state["dir"] = payload.decode()
        return payload

    def on_session_end(self, session: SessionContext) -> None:
        directory = session.state.get("dir")
        if directory:
            with open(os.path.join(directory, f"ended-{session.id}"), "w") as f:
                f.write("ended")


LONG_REASON = "the licence server refused this node: " + "no seat left, " * 32


class LongStartError(Handler):
    """Its session start hook raises a ~490-character error: every batch is dead."""

    def on_session_start(self, session: SessionContext) -> None:
        raise RuntimeError(LONG_REASON)

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        return payload


def oversized(payload: bytes, shared: bytes | None) -> bytes:
    """``big-answer``: a 4.2 MB answer; ``big-error``: a 4.2 MB error; else echo."""
    if payload == b"big-answer":
        return b"a" * 4_200_000
    if payload == b"big-error":
        raise ValueError("e" * 4_200_000)
    return payload
