"""Chaos at cluster scale, in every CI run: one seeded run of
``tests/support/chaos_cluster.py`` in a process of its own (a Ray cluster of
raylets on this machine, beside the test session's Ray, never instead of it).

A thousand faults and more across nodes, node bridges, actors, streams, the
queue-manager link and the node cache; every task of every session must be
answered exactly once or dead-lettered once with a reason, each answer with its
own task's payload and its session's shared data at the level asked for;
nothing of the run may be left behind, and the long-lived processes' memory
stays flat. The seed, every fault and the outcome table are printed (``pytest
-s``); the figures go to ``benchmarks/out/chaos-figures.json``. ``CHAOS_SEED``
replays a run; ``CHAOS_SCALE=10`` is the long mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.chaos_plan import MIN_FAULTS, MINIMUMS

ROOT = Path(__file__).resolve().parents[2]
_SESSION_RAY_ENV = ("RAY_AUTH_MODE", "RAY_ADDRESS", "PYTHONBREAKPOINT")
SCALE = float(os.environ.get("CHAOS_SCALE", "1"))

pytestmark = pytest.mark.timeout(int(600 * max(1.0, SCALE)))


def test_chaos_at_cluster_scale_loses_and_doubles_nothing() -> None:
    # Not the test session's own Ray settings: its ray.init set RAY_AUTH_MODE=token
    # in os.environ, which a client of this cluster (auth disabled) must not get.
    env = {k: v for k, v in os.environ.items() if k not in _SESSION_RAY_ENV}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.chaos_cluster"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=int(540 * max(1.0, SCALE)),
    )
    lines = proc.stdout.splitlines()
    print("\n".join(x for x in lines if not x.startswith("RESULT ")), flush=True)
    results = [x for x in lines if x.startswith("RESULT ")]
    assert results, proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads(results[-1][len("RESULT ") :])
    figures = {k: v for k, v in r.items() if k not in ("fault_log", "stall_report")}
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos-figures.json").write_text(json.dumps(figures, indent=1))
    # What a failure shows first (CI prints the head of it): the checks that
    # failed, which tasks went unanswered, and the stall report, if any.
    why = "\n".join(
        [f"failed checks: {r['failed_checks']}", f"lost e.g. {r['lost_examples']}",
         f"doubled e.g. {r['doubled_examples']}", f"replay: CHAOS_SEED={r['seed']}",
         *r.get("stall_report", [])[:40]]
    )  # fmt: skip
    assert r["lost"] == 0 and r["doubled"] == 0, why
    assert r["wrong_count"] == 0, r["wrong"]
    assert r["faults_total"] >= MIN_FAULTS, why
    for kind, least in MINIMUMS.items():
        assert r["faults_injected"].get(kind, 0) >= least, (kind, why)
    assert not r["actors_alive"] and not r["processes_left"], why
    assert r["memory"], "no long-lived process was sampled"
    for m in r["memory"]:
        assert m["growth"] < 0.10, (m, why)
    assert r["failed_checks"] == [] and proc.returncode == 0, why
