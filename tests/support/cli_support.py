"""Running the three command-line programs as subprocesses (what a user runs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The one timestamp format of every CLI (ray_alpcrun.logs.timestamp).
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Cli:
    """``python -m MODULE ARGS`` with its output in a file (a full pipe would stall it)."""

    def __init__(self, module: str, args: list[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
        full_env.pop("METALCORE_API_KEY", None)
        full_env.update(env or {})
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in wait()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def output(self) -> str:
        self.log.seek(0)
        text = self.log.read()
        self.log.seek(0, 2)
        return text

    def wait_for(self, text: str, timeout_s: float = 90.0) -> str:
        """Poll the output until ``text`` shows (the process writes a file, not an event)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {text!r}:\n{out}")
            time.sleep(0.05)  # ok: polling a subprocess's output file
        raise AssertionError(f"{text!r} not printed within {timeout_s} s:\n{self.output()}")

    def wait(self, timeout_s: float = 90.0) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        out = self.output()
        self.log.close()
        return code, out


def run(module: str, *args: str, timeout_s: float = 60.0) -> tuple[int, str]:
    return Cli(module, list(args)).wait(timeout_s)


def json_records(out: str) -> list[dict[str, Any]]:
    """Every line as a JSON object (fails on the first line that is not one)."""
    records = []
    for line in out.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise AssertionError(f"not a JSON line: {line!r}") from exc
        assert isinstance(record, dict), line
        assert TIMESTAMP.match(str(record.get("ts"))), line
        records.append(record)
    return records
