"""A real Prometheus server for tests: Debian's ``prometheus`` package
(``/usr/bin/prometheus``; ``.ci/run`` installs it), on a free loopback port,
with a temporary data directory and a 1 s scrape interval.

Without the binary :func:`binary` fails the test (it never skips): a dashboard
check that cannot run must not pass quietly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_autoscaler import free_port

SCRAPE_INTERVAL_S = 1
JOB = "ray_alpcrun"
# Overrides where the binary is (the default: on PATH, else Debian's path).
BINARY_ENV = "ALPCRUN_TEST_PROMETHEUS"
DEBIAN_BINARY = "/usr/bin/prometheus"


def binary() -> str:
    """The Prometheus binary; fails the test when there is none."""
    path = os.environ.get(BINARY_ENV) or shutil.which("prometheus") or DEBIAN_BINARY
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(
            f"no Prometheus binary at {path}: install Debian's package "
            f"(apt-get install prometheus; .ci/run does) or set {BINARY_ENV}",
            pytrace=False,
        )
    return path


class Prometheus:
    """A running server; :meth:`query` is its ``/api/v1/query``."""

    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.process = process
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as exc:  # a bad query: 400 with Prometheus's reason
            body = json.loads(exc.read())
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus refused {params}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query now: (labels, value) per series."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise AssertionError(f"{expr}: a {data['resultType']}, not an instant vector")
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def label_values(self, selector: str, label: str) -> list[str]:
        """What Grafana's ``label_values(selector, label)`` lists."""
        values: list[str] = self._get(f"/api/v1/label/{label}/values", **{"match[]": selector})
        return values

    def scrapes(self) -> int:
        """Scrapes of the bridge so far (samples of its ``up`` series)."""
        answer = self.query(f'count_over_time(up{{job="{JOB}"}}[1h])')
        return int(answer[0][1]) if answer else 0

    def wait(self, what: str, done: Callable[[], bool], timeout_s: float = 20.0) -> bool:
        """Poll ``done`` (Prometheus has no event to wait on) until it holds or
        ``timeout_s`` passes; False then."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.process.poll() is not None:
                raise AssertionError(f"Prometheus exited while waiting for {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)  # ok: polling Prometheus's HTTP API, bounded by the deadline
        return True

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@contextmanager
def prometheus(targets: list[str], workdir: Path) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (``host:port``, path ``/metrics``) every second."""
    config = workdir / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {
                    "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                    "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                    "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
                },
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
            }
        )
    )
    port = free_port()
    log = workdir / "prometheus.log"
    argv = [
        binary(),
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    server = Prometheus(port, process, log)
    try:
        if not server.wait("/-/ready", lambda: _ready(server), timeout_s=30.0):
            raise AssertionError(f"Prometheus not ready within 30 s:\n{server.tail()}")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _ready(server: Prometheus) -> bool:
    try:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False
