"""Log lines: a field named like one of the line's own keys stays a field."""

from __future__ import annotations

import json
import logging

from ray_alpcrun.logs import JsonFormatter, fields, json_line


def test_a_field_named_level_does_not_break_or_replace_the_line() -> None:
    line = json.loads(json_line("served", "info", "x", 0.0, level=2, msg="m", session="s"))
    assert line["level"] == "info" and line["msg"] == "served"
    assert line["level_"] == 2 and line["msg_"] == "m" and line["session"] == "s"


def test_the_json_formatter_keeps_a_level_field() -> None:
    record = logging.LogRecord("ray_alpcrun.x", logging.INFO, __file__, 1, "shared data", (), None)
    for key, value in fields(level=1, session="s").items():
        setattr(record, key, value)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "info" and line["level_"] == 1 and line["session"] == "s"
