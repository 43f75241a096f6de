"""Structured logging: ``key=value`` fields after the message, or JSON lines.

Use ``log.info("batch done", extra=fields(session=sid, batch=bid, ms=12.5))``;
the API key is never passed to a logger anywhere in the project.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "alpcrun_fields"
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


def fields(**values: Any) -> dict[str, Any]:
    """Structured fields for one log call (``extra=fields(...)``)."""
    return {_FIELDS: values}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        base = f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<5} {record.name}: "
        base += record.getMessage()
        extra = getattr(record, _FIELDS, None)
        if extra:
            base += " " + " ".join(f"{k}={_kv(v)}" for k, v in extra.items())
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, _FIELDS, None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _kv(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def setup_logging(level: str = "info", json_lines: bool = False) -> None:
    """Configure the ``ray_alpcrun`` loggers (stderr). Idempotent."""
    logger = logging.getLogger("ray_alpcrun")
    logger.setLevel(level.upper())
    for h in list(logger.handlers):
        if getattr(h, "_alpcrun", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    handler._alpcrun = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False
