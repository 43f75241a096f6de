"""Running the three command-line programs as subprocesses (what a user runs)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_alpcrun.bridge.launch import start_bridge
from ray_alpcrun.client import TaskResult
from tests.support.bridge_support import bridge_config, client_for, ray_get

ROOT = Path(__file__).resolve().parents[2]
# The one timestamp format of every CLI (ray_alpcrun.logs.timestamp).
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Cli:
    """``python -m MODULE ARGS`` with its output in a file (a full pipe would stall it)."""

    def __init__(
        self,
        module: str,
        args: list[str],
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        unset: tuple[str, ...] = (),
    ) -> None:
        full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for name in ("METALCORE_API_KEY", *unset):
            full_env.pop(name, None)
        full_env.update(env or {})
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in wait()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=cwd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, text=True,
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
        code, _, out = self.wait_timed(timeout_s)
        return code, out

    def wait_timed(self, timeout_s: float = 90.0) -> tuple[int, float, str]:
        """(exit code, seconds from start to exit, everything it printed); kills it
        if it is still running after ``timeout_s``."""
        try:
            code = self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        elapsed_s = time.perf_counter() - self.started
        out = self.output()
        self.log.close()
        return code, elapsed_s, out


def run(
    module: str, *args: str, timeout_s: float = 60.0, outside: Path | None = None
) -> tuple[int, str]:
    """Run a CLI to its end; ``outside``: from that directory, with only the installed
    package on the path (as a user who ran ``pip install`` runs it)."""
    if outside is None:
        return Cli(module, list(args)).wait(timeout_s)
    return Cli(module, list(args), env={"PYTHONPATH": ""}, cwd=outside).wait(timeout_s)


@dataclass
class Drained:
    """What ``sigterm_midway`` saw."""

    code: int  # the bridge CLI's exit code
    out: str  # everything it printed
    drain_s: float  # seconds from SIGTERM to its exit
    in_flight: int  # batches delivered and not yet answered when the signal was sent
    stats: dict[str, Any]  # the queue manager's counters once it had exited
    results: list[TaskResult]  # every result of the session, the finisher's included


def sigterm_midway(
    svc: Any,
    bridge: Cli,
    n: int,
    after: int,
    app_id: str,
    finisher_actors: int = 1,
    **finisher_kw: Any,
) -> Drained:
    """Submit ``n`` tasks (payloads ``b"0"``, ``b"1"``, ... in batches of 10) to the
    ``bridge`` CLI serving ``svc``; once ``after`` results came back, SIGTERM it and
    wait for it to exit, then start an in-process bridge (echo handler,
    ``finisher_actors``, ``finisher_kw``) that answers the rest, so that the
    session completes and nothing lost or doubled goes unseen."""
    results: list[TaskResult] = []
    finisher = None
    try:
        with client_for(svc) as client:
            session = client.create_session(app_id=app_id)
            for r in session.submit([f"{i}".encode() for i in range(n)], batch_size=10):
                results.append(r)
                if len(results) == after:
                    in_flight = svc.stats()["deliveries"] - svc.stats()["result_batches"]
                    bridge.proc.send_signal(signal.SIGTERM)
                    signalled = time.perf_counter()
                    code, out = bridge.wait(90)
                    drain_s = time.perf_counter() - signalled
                    stats = svc.stats()
                    echo = "tests.support.bridge_handlers:echo"
                    finisher = start_bridge(
                        bridge_config(svc, echo, finisher_actors, **finisher_kw)
                    )
            session.close()
    finally:
        if finisher is not None:
            ray_get(finisher.stop(drain=False))
    return Drained(code, out, drain_s, in_flight, stats, results)


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
