"""What the actors print, as the driver shows it.

Ray's driver prints every line an actor writes as ``(Bridge pid=N) line`` with
ANSI colours. That breaks ``--log-json`` (one JSON object per line) and puts
escape codes into log files. :func:`forward_actor_output` swaps Ray's printer
for one that, with JSON, passes the actors' own JSON lines through (adding
``pid`` and ``actor``) and wraps any other line; in text mode it keeps Ray's
prefix and drops the colours when the stream is not a terminal.

Ray has no public hook for this: the printer is a named handler on
``ray._private``'s stream dispatcher. If that changes, Ray's printer stays.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import TypedDict

from ray_alpcrun.logs import json_line

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PRINTER = "ray_print_logs"
_TQDM_MAGIC = "__ray_tqdm_magic_token__"


class LogBatch(TypedDict, total=False):
    """One batch of lines from one Ray process, as Ray's stdstream dispatcher hands it over."""

    ip: str
    pid: int | str  # a worker's pid, or "raylet" / "autoscaler"
    job: str
    is_err: bool
    lines: list[str]
    actor_name: str
    task_name: str


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def forward_actor_output(json_lines: bool) -> bool:
    """Print what Ray forwards from the actors our way; False if Ray's printer stays."""
    if not json_lines and sys.stdout.isatty() and sys.stderr.isatty():
        return False  # a terminal: Ray's coloured prefixes are fine there
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - a Ray without the private dispatcher
        log.warning("cannot reformat actor output with this Ray version")
        return False
    if not any(name == _RAY_PRINTER for name, _ in dispatcher.handlers):
        return False  # log_to_driver=False: nothing is forwarded
    dispatcher.remove_handler(_RAY_PRINTER)
    dispatcher.add_handler(_RAY_PRINTER, functools.partial(print_batch, json_lines=json_lines))
    return True


def print_batch(data: LogBatch, json_lines: bool) -> None:
    """One batch of lines from one Ray process (Ray's ``LogBatch``)."""
    sink = sys.stderr if data.get("is_err") else sys.stdout
    pid = data.get("pid")
    source = data.get("actor_name") or data.get("task_name") or ""
    lines: Sequence[str] = data.get("lines", ())
    if pid == "autoscaler":
        lines = _autoscaler_events(lines)
    for line in lines:
        if _TQDM_MAGIC in line:
            continue
        text = strip_ansi(line)
        if json_lines:
            print(_as_json(text, pid, source), file=sink)
        elif pid in ("raylet", "autoscaler"):
            print(f"({pid}) {text}", file=sink)
        else:
            print(f"({source + ' ' if source else ''}pid={pid}) {text}", file=sink)
    sink.flush()


def _autoscaler_events(lines: Sequence[str]) -> Sequence[str]:
    """What Ray's own printer keeps of the autoscaler's output (its events only)."""
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:  # pragma: no cover - a Ray without it: drop the status dumps
        return ()
    events: list[str] = filter_autoscaler_events(list(lines))
    return events


def format_ray_logger(json_lines: bool) -> None:
    """Ray's own driver-side logger prints through our formatter (one timestamp
    format; JSON with ``--log-json``)."""
    from ray_alpcrun.logs import JsonFormatter, KeyValueFormatter

    logger = logging.getLogger("ray")
    for old in list(logger.handlers):
        # Ray's PlainRayHandler formats by itself, whatever formatter it is given.
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    logger.addHandler(handler)


def _as_json(text: str, pid: object, source: str) -> str:
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if isinstance(record, dict):
        record.setdefault("pid", pid)
        if source:
            record.setdefault("actor", source)
        return json.dumps(record, default=str)
    if source:
        return json_line(text, "info", "ray", pid=pid, actor=source)
    return json_line(text, "info", "ray", pid=pid)
