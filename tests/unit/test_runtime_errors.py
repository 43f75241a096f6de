"""A handler's failures show their cause (issue 11, item 5): a failed task's
traceback is logged at WARNING with its session and position, rate-limited; a
failing ``process_batch`` fast path is a WARNING once per session."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from ray_alpcrun.errors import SessionSetupError
from ray_alpcrun.handler import Handler, SessionContext, load_handler
from ray_alpcrun.runtime import HandlerRuntime, SharedSpec, TracebackLog

LOGGER = "ray_alpcrun.runtime"


def _fail_some(payload: bytes, shared: bytes | None) -> bytes:
    if payload.startswith(b"fail"):
        raise ValueError(f"bad payload {payload!r}")
    return payload


class BrokenFastPath(Handler):
    def process(self, payload: bytes, session: SessionContext) -> bytes:
        return payload

    def process_batch(self, payloads: list[bytes], session: SessionContext) -> list[bytes]:
        raise RuntimeError("vectorised path broken")


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    # Directly on the logger: a CLI run in this process (setup_logging) stops
    # "ray_alpcrun" records from propagating to caplog's root handler.
    logger = logging.getLogger(LOGGER)
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    unique = {id(r): r for r in caplog.records}  # reached by both handlers when propagating
    return [r for r in unique.values() if r.name == LOGGER]


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return dict(getattr(record, "alpcrun_fields", {}))


def test_a_failed_task_logs_its_traceback_with_ids(caplog: pytest.LogCaptureFixture) -> None:
    runtime = HandlerRuntime(load_handler(_fail_some))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = runtime.run("s1", [b"ok", b"fail-1"])
    assert out[0] == (b"ok", None)
    assert out[1][1] is not None and "ValueError" in out[1][1]
    [record] = _records(caplog)
    assert record.levelno == logging.WARNING and record.exc_info is not None
    assert "_fail_some" in caplog.text  # the traceback names the handler's frame
    assert _fields(record)["session"] == "s1" and _fields(record)["task"] == 1


def test_tracebacks_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiter = TracebackLog(burst=3, window_s=10.0, clock=lambda: now[0])
    exc = ValueError("x")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        logged = [limiter.log(exc, task=i) for i in range(10)]
        now[0] = 11.0
        assert limiter.log(exc, task=10)
    assert logged == [True] * 3 + [False] * 7
    records = _records(caplog)
    assert len(records) == 4
    assert _fields(records[-1])["tracebacks_left_out"] == 7


def test_a_failing_fast_path_warns_once_per_session(caplog: pytest.LogCaptureFixture) -> None:
    runtime = HandlerRuntime(BrokenFastPath())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            assert runtime.run("s1", [b"a", b"b"]) == [(b"a", None), (b"b", None)]
        runtime.run("s2", [b"a", b"b"])
    warnings = [r for r in _records(caplog) if "fast path failed" in r.getMessage()]
    assert [_fields(r)["session"] for r in warnings] == ["s1", "s2"]
    assert "vectorised path broken" in warnings[0].getMessage()


class BadSharedData(Handler):
    def decode_shared(self, payload: bytes) -> object:
        raise ValueError("not the format this handler reads")

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        return payload


@pytest.mark.parametrize("failing", ["decode_shared", "on_session_start"])
def test_sessions_that_fail_to_start_leave_no_state(failing: str) -> None:
    # Issue 18 item 11: a session that never starts must not leave per-session entries.
    class FailingStart(BadSharedData):
        def decode_shared(self, payload: bytes) -> object:
            return payload

        def on_session_start(self, session: SessionContext) -> None:
            raise RuntimeError("no licence")

    runtime = HandlerRuntime(BadSharedData() if failing == "decode_shared" else FailingStart())
    for n in range(100):
        spec = SharedSpec(1, lambda: b"shared")
        with pytest.raises(SessionSetupError):
            runtime.run(f"s{n}", [b"task"], spec)
    assert runtime.session_ids == []
    assert runtime._decoded == {} and runtime._highest == {}


def _fail_huge(payload: bytes, shared: bytes | None) -> bytes:
    raise ValueError("e" * 4_000_000)


def test_a_huge_error_is_clipped_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    # A handler failing with a 4 MB message printed 4 MB into the bridge's log.
    runtime = HandlerRuntime(load_handler(_fail_huge))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        [(_, error)] = runtime.run("s", [b"x"])
    assert error is not None and len(error) > 4_000_000  # the task's answer keeps it whole
    [record] = _records(caplog)
    assert len(record.getMessage()) < 5000 and "4000012 characters" in record.getMessage()
    assert "_fail_huge" in record.getMessage()  # the frames are still there
