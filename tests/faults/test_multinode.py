"""The bridge on multi-node Ray clusters, each scenario in a process of its own
(``tests/support/multinode_scenarios.py``): a Ray of their own beside the test session's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(420)
_SESSION_RAY_ENV = ("RAY_AUTH_MODE", "RAY_ADDRESS", "PYTHONBREAKPOINT")


def scenario(*args: str, timeout_s: float) -> dict[str, Any]:
    # Not the test session's own Ray settings: its ray.init set RAY_AUTH_MODE=token
    # in os.environ, which a client of the fake clusters (auth disabled) must not get.
    env = {k: v for k, v in os.environ.items() if k not in _SESSION_RAY_ENV}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.multinode_scenarios", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def test_three_nodes_shared_data_per_node_and_a_node_removed_mid_session() -> None:
    r = scenario("three-nodes", timeout_s=360)
    shared = r["shared"]
    # Six actors read one object: it is copied at most once to each of their nodes.
    assert shared["copies"] <= shared["nodes"] < shared["actors"]
    removed = r["node_removed"]
    assert removed["restarts"] >= 1  # the lost actor was replaced on a live node
    # Each node's logical workers were registered under its own name, and a node
    # bridge killed mid-session was replaced (every task answered once: checked there).
    assert set(removed["expected_nodes"]) <= set(removed["worker_nodes"])
    assert removed["bridges_replaced"] >= 1
    # /metrics has a series per live node bridge (the removed node's has gone).
    live = set(removed["expected_nodes"]) - {removed["removed_node"]}
    assert live <= set(removed["metric_nodes"]), removed


def test_autoscaling_cluster_from_zero_gpu_nodes_and_back() -> None:
    # 400 tasks of 60 ms: long enough on one actor for the cluster to grow.
    r = scenario("autoscale", "400", "60", timeout_s=400)
    assert r["ready_text"].startswith("ok")
    assert r["max_gpu_nodes"] >= 2 and r["workers_used"] >= 2
    assert r["scale_down_s"] < 90 and r["bridge_exit"] == 0 and r["stray_processes"] == 0
    # A bridge ran on every GPU node; each node whose actors were all released had
    # its bridge drained and stopped (or it went with its node), none is left.
    assert r["max_node_bridges"] >= 2 and r["node_bridges_left"] == 0, r
