"""Drives a :class:`~ray_alpcrun.handler.Handler` through the session life cycle.

One ``HandlerRuntime`` lives in each pool actor (and in the plain reference
worker). It keeps per-session state, decodes shared data once per
(session, update level), and turns handler exceptions into per-task errors.
Each batch sees exactly the shared data it asked for: ``session.shared`` is
``None`` for a batch without ``use_shared_data`` and the requested level's data
otherwise, even when a newer level was seen before. No Ray, no gRPC.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

from ray_alpcrun.errors import SessionSetupError
from ray_alpcrun.handler import Handler, SessionContext
from ray_alpcrun.logs import fields

log = logging.getLogger(__name__)

# (payload, None) for a result, (None, error) for a failed task.
Outcome = tuple[bytes | None, str | None]

DEFAULT_MAX_SESSIONS = 32
# Decoded levels kept per session: the newest and one older one a batch may still ask for.
SHARED_LEVELS_PER_SESSION = 2


# The longest error text a log line carries (the task's answer has it whole).
LOG_ERROR_CHARS = 2000


def describe(exc: BaseException) -> str:
    """The error text a failed task carries: exception type and message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True, slots=True)
class SharedSpec:
    """Which shared data a batch needs; ``fetch`` is called only on a cache miss."""

    level: int | None
    fetch: Callable[[], bytes]


class HandlerRuntime:
    """Per-process session table around one handler instance.

    ``to_device`` (e.g. a CuPy upload) is applied to decoded shared data once per
    (session, level); ``xp`` and ``device`` are handed to the handler through
    the session context.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        xp: ModuleType | None = None,
        device: object = None,  # the GPU actor's pool.gpu.Device: handed to the handler
        to_device: Callable[[object], object] | None = None,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.handler = handler
        self.max_sessions = max_sessions
        self.xp = xp
        self.device = device
        self._to_device = to_device
        self._sessions: OrderedDict[str, SessionContext] = OrderedDict()
        # Decoded shared data per session and level (a batch may ask for any level),
        # and the highest level each session has seen (for ``on_shared_update``).
        self._decoded: dict[str, OrderedDict[int | None, object]] = {}
        self._highest: dict[str, int | None] = {}
        self.shared_decodes = 0
        self._tracebacks = TracebackLog()
        self._fast_path_warned: set[str] = set()  # sessions told their process_batch failed

    @property
    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def session(
        self, session_id: str, shared: SharedSpec | None = None, tags: Sequence[str] = ()
    ) -> SessionContext:
        """The session's context, started (and its shared data brought up to date) if needed."""
        ctx = self._sessions.get(session_id)
        if ctx is None:
            ctx = SessionContext(id=session_id, tags=tuple(tags), xp=self.xp, device=self.device)
            self._decoded[session_id] = OrderedDict()
            self._highest[session_id] = None if shared is None else shared.level
            try:
                self._select(ctx, shared)  # SessionSetupError if the data cannot be decoded
                try:
                    self.handler.on_session_start(ctx)
                except Exception as exc:
                    raise SessionSetupError(
                        f"session start hook failed for {session_id}: {describe(exc)}"
                    ) from exc
            except BaseException:
                # Not in _sessions, so no end or eviction would ever drop these.
                self._decoded.pop(session_id, None)
                self._highest.pop(session_id, None)
                raise
            self._sessions[session_id] = ctx
            self._evict()
        else:
            self._sessions.move_to_end(session_id)
            self._select(ctx, shared)
            highest = self._highest.get(session_id)
            if shared is not None and _is_newer(shared.level, highest):
                self._highest[session_id] = shared.level
                try:
                    self.handler.on_shared_update(ctx, highest)
                except Exception as exc:
                    raise SessionSetupError(
                        f"shared-data update hook failed for {session_id}: {describe(exc)}"
                    ) from exc
        return ctx

    def has_shared(self, session_id: str, level: int | None) -> bool:
        """Whether ``session_id``'s shared data at ``level`` is decoded here."""
        return session_id in self._sessions and level in self._decoded.get(session_id, {})

    def _select(self, ctx: SessionContext, shared: SharedSpec | None) -> None:
        """Make ``ctx.shared``/``ctx.update_level`` those of the batch in hand:
        nothing for a batch that asks for no shared data, else exactly its level."""
        if shared is None:
            ctx.shared, ctx.update_level = None, None
            return
        decoded = self._decoded.setdefault(ctx.id, OrderedDict())
        if shared.level in decoded:
            decoded.move_to_end(shared.level)
        else:
            decoded[shared.level] = self._decode(ctx, shared)
            while len(decoded) > SHARED_LEVELS_PER_SESSION:
                decoded.popitem(last=False)
        ctx.shared, ctx.update_level = decoded[shared.level], shared.level

    def run(
        self,
        session_id: str,
        payloads: Sequence[bytes],
        shared: SharedSpec | None = None,
        tags: Sequence[str] = (),
    ) -> list[Outcome]:
        """Process one (sub-)batch; one outcome per payload, in order.

        Raises :class:`SessionSetupError` when nothing can run (see there).
        """
        ctx = self.session(session_id, shared, tags)
        batch_fn = self.handler.process_batch
        if batch_fn is not None and len(payloads) > 1:
            try:
                results = batch_fn(list(payloads), ctx)
            except Exception as exc:
                # Fall back to one task at a time so only the culprit fails.
                self._fast_path_failed(ctx, f"process_batch raised {describe(exc)}", exc)
            else:
                if len(results) == len(payloads):
                    return [_outcome(r) for r in results]
                self._fast_path_failed(
                    ctx, f"process_batch returned {len(results)} results for {len(payloads)} tasks"
                )
        out: list[Outcome] = []
        process = self.handler.process
        for index, payload in enumerate(payloads):
            try:
                out.append(_outcome(process(payload, ctx)))
            except Exception as exc:
                out.append((None, describe(exc)))
                self._tracebacks.log(exc, session=session_id, task=index, tasks=len(payloads))
        return out

    def _fast_path_failed(
        self, ctx: SessionContext, reason: str, exc: BaseException | None = None
    ) -> None:
        """WARNING once per session (with the traceback): every later batch of the
        session pays for the task-by-task fallback, so the user must hear of it."""
        if ctx.id in self._fast_path_warned:
            log.debug("process_batch fast path failed again: %s", reason, extra=_f(ctx.id))
            return
        self._fast_path_warned.add(ctx.id)
        log.warning(
            "process_batch fast path failed (%s); running this session's batches task by "
            "task when it fails (warned once per session)",
            reason,
            exc_info=exc,
            extra=_f(ctx.id),
        )

    def end_session(self, session_id: str) -> bool:
        """Run the end hook and drop the session's state; False if it was not here."""
        ctx = self._sessions.pop(session_id, None)
        if ctx is None:
            return False
        self._finish(ctx)
        return True

    def close(self) -> None:
        for session_id in list(self._sessions):
            self.end_session(session_id)

    def _evict(self) -> None:
        while len(self._sessions) > self.max_sessions:
            _, oldest = self._sessions.popitem(last=False)
            log.info("session %s evicted from this actor (max %d)", oldest.id, self.max_sessions)
            self._finish(oldest)

    def _finish(self, ctx: SessionContext) -> None:
        self._fast_path_warned.discard(ctx.id)
        try:
            self.handler.on_session_end(ctx)
        except Exception:
            log.exception("session end hook failed for %s", ctx.id)
        ctx.shared = None
        ctx.state.clear()
        self._decoded.pop(ctx.id, None)
        self._highest.pop(ctx.id, None)

    def _decode(self, ctx: SessionContext, shared: SharedSpec) -> object:
        try:
            value = self.handler.decode_shared(shared.fetch())
            if self._to_device is not None:
                value = self._to_device(value)
        except Exception as exc:
            raise SessionSetupError(
                f"shared data for session {ctx.id} (level {shared.level}) could not be "
                f"loaded: {describe(exc)}"
            ) from exc
        self.shared_decodes += 1
        return value


def _f(session_id: str) -> dict[str, object]:
    return fields(session=session_id)


class TracebackLog:
    """Logs a failed task's traceback at WARNING, at most ``burst`` per ``window_s``
    (a handler failing every task must not flood the log); the next logged one
    says how many were left out."""

    def __init__(
        self, burst: int = 5, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._window_start = -float("inf")
        self._logged = 0
        self.suppressed = 0

    def log(self, exc: BaseException, **context: object) -> bool:
        now = self._clock()
        if now - self._window_start >= self.window_s:
            self._window_start, self._logged = now, 0
        if self._logged >= self.burst:
            self.suppressed += 1
            return False
        self._logged += 1
        left_out, self.suppressed = self.suppressed, 0
        text = describe(exc)
        if len(text) <= LOG_ERROR_CHARS:
            log.warning(
                "task failed in the handler: %s",
                text,
                exc_info=(type(exc), exc, exc.__traceback__),
                extra=fields(**context, tracebacks_left_out=left_out),
            )
            return True
        # A huge message (a 4 MB error) is clipped in the log: the task's own error
        # carries it, within the batch limit (ray_alpcrun.answers).
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.warning(
            "task failed in the handler: %s... (%d characters)\n%s",
            text[:LOG_ERROR_CHARS],
            len(text),
            frames.rstrip(),
            extra=fields(**context, tracebacks_left_out=left_out),
        )
        return True


def _is_newer(level: int | None, current: int | None) -> bool:
    if level is None:
        return False
    return current is None or level > current


def _outcome(result: object) -> Outcome:
    if isinstance(result, BaseException):
        return None, describe(result)
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result), None
    return None, f"TypeError: handler returned {type(result).__name__}, expected bytes"
