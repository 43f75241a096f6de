"""Structured logging: ``key=value`` fields after the message, or JSON lines.

Use ``log.info("batch done", extra=fields(session=sid, batch=bid, ms=12.5))``;
the API key is never passed to a logger anywhere in the project.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

_FIELDS = "alpcrun_fields"
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


def fields(**values: object) -> dict[str, object]:
    """Structured fields for one log call (``extra=fields(...)``)."""
    return {_FIELDS: values}


def log_task_failure(task: asyncio.Future[Any]) -> None:
    """Done callback of a background task: its exception (not its cancellation) is
    logged when it ends, instead of waiting unretrieved for the garbage collector.

    >>> task.add_done_callback(log_task_failure)   # doctest: +SKIP
    """
    if task.cancelled() or task.exception() is None:
        return
    name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
    logging.getLogger(__name__).error(
        "background task failed", exc_info=task.exception(), extra=fields(task=name)
    )


def timestamp(created: float) -> str:
    """The one timestamp format of every CLI: UTC, ISO 8601, milliseconds."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{stamp}.{int(created * 1000) % 1000:03d}Z"


def json_line(
    msg: str,
    level: str = "info",
    logger: str = "ray_alpcrun",
    created: float | None = None,
    /,
    **extra: object,
) -> str:
    """One JSON log line in the shape of :class:`JsonFormatter` (for ``print``).

    The first four are positional-only, so a field named ``level`` or ``msg``
    (``fields(level=2)``) is a field, not a clash; it is written as ``level_``
    so that the line's own keys keep their meaning."""
    out: dict[str, object] = {
        "ts": timestamp(time.time() if created is None else created),
        "level": level,
        "logger": logger,
        "msg": msg,
    }
    for key, value in extra.items():
        out[f"{key}_" if key in out else key] = value
    return json.dumps(out, default=str)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"{timestamp(record.created)} {record.levelname:<5} {record.name}: "
        base += record.getMessage()
        extra = getattr(record, _FIELDS, None)
        if extra:
            base += " " + " ".join(f"{k}={_kv(v)}" for k, v in extra.items())
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = dict(getattr(record, _FIELDS, None) or {})
        if record.exc_info:
            extra["exc"] = self.formatException(record.exc_info)
        return json_line(
            record.getMessage(), record.levelname.lower(), record.name, record.created, **extra
        )


def _kv(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def setup_logging(level: str = "info", json_lines: bool = False) -> None:
    """Configure the ``ray_alpcrun`` loggers (stderr). Idempotent.

    Other libraries' records (Ray, gRPC, ``warnings``) at WARNING and above go
    through the same formatter, so that with ``json_lines`` every line is JSON.
    """
    formatter = JsonFormatter() if json_lines else KeyValueFormatter()
    logger = logging.getLogger("ray_alpcrun")
    logger.setLevel(level.upper())
    _install(logger, formatter)
    logger.propagate = False
    root = logging.getLogger()
    if all(getattr(h, "_alpcrun", False) for h in root.handlers):
        # Only where nobody else (a Ray worker, pytest, an application) configured it.
        _install(root, formatter, logging.WARNING)
    logging.captureWarnings(True)
    # Records of a logger with no handler anywhere (Ray's, while ray.init resets
    # them) go to the last-resort handler: ours, not a plain line.
    last = logging.StreamHandler(sys.stderr)
    last.setFormatter(formatter)
    last.setLevel(logging.WARNING)
    logging.lastResort = last


def _install(logger: logging.Logger, formatter: logging.Formatter, level: int = 0) -> None:
    for h in list(logger.handlers):
        if getattr(h, "_alpcrun", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.setLevel(level)
    handler._alpcrun = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
