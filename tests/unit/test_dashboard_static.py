"""The Grafana dashboard and the bridge's metrics, without Prometheus: every metric
the dashboard draws is on ``/metrics`` and every one on ``/metrics`` is drawn; the
checker of ``tests/integration/test_dashboard.py`` names the panel of a renamed
metric; the GPU exemption covers GPU panels only; Prometheus naming rules."""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterator

import pytest

from ray_alpcrun.bridge.actor import Bridge
from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.bridge.stats import LATENCY_BUCKETS_S
from ray_alpcrun.config import PoolConfig
from tests.support import dashboard_check as dc


@pytest.fixture(scope="module")
def exposition() -> Iterator[str]:
    """A bridge's ``/metrics`` before it runs: every family with its HELP and TYPE."""
    logger = logging.getLogger("ray_alpcrun")
    saved = (list(logger.handlers), logger.level, logger.propagate, logging.lastResort)
    settings = WorkerSettings("127.0.0.1:1", "127.0.0.1:2", "k", "ghpc.v1", "n", "p", 1)
    bridge = Bridge("tests.support.handlers:echo", PoolConfig(num_actors=2), settings)
    # A Bridge configures the package's logger; give pytest's back.
    logger.handlers[:], logger.level, logger.propagate, logging.lastResort = saved
    yield bridge.metrics.render()


def families(text: str) -> dict[str, tuple[str, str]]:
    """name -> (type, help) of every family in an exposition."""
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", text, re.MULTILINE))
    return {name: (kind, helps.get(name, "")) for name, kind in types.items()}


def series_names(text: str) -> set[str]:
    """The names a PromQL query can use: a histogram's _bucket, _sum and _count."""
    out = set()
    for name, (kind, _) in families(text).items():
        if kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "counter":
            out.add(name if name.endswith("_total") else f"{name}_total")
        else:
            out.add(name)
    return out


def fake_prometheus(text: str) -> dc.Query:
    """A query that answers one series of value 1 when every metric it names is exposed."""
    exposed = series_names(text)
    return lambda expr: [({}, 1.0)] if dc.metric_names(expr) <= exposed else []


def test_dashboard_and_metrics_name_the_same_series(exposition: str) -> None:
    drawn = set().union(*(t.names for t in dc.targets(dc.load())))
    exposed = series_names(exposition)
    assert drawn - exposed == set(), "the dashboard draws metrics the bridge does not expose"
    histograms = {n for n, (k, _) in families(exposition).items() if k == "histogram"}
    undrawn = {n for n in exposed - drawn if not any(n.startswith(h) for h in histograms)}
    assert undrawn == set(), "metrics on /metrics that no panel draws"


def test_a_renamed_metric_is_reported_with_its_panel(exposition: str) -> None:
    dashboard = dc.load()
    values = {"__rate_interval": "1m", "bridge": ".*", "node": ".*"}
    query = fake_prometheus(exposition)
    assert dc.problems(dc.check(dashboard, query, values, lambda t, s: None)) == []
    drifted = copy.deepcopy(dashboard)
    text = json.dumps(drifted).replace("alpcrun_tasks_dead_total", "alpcrun_tasks_deadd_total")
    problems = dc.problems(dc.check(json.loads(text), query, values, lambda t, s: None))
    assert problems == [
        "Tasks per second / answered dead by the bridge: "
        "no series (metrics ['alpcrun_tasks_deadd_total'])"
    ]


def test_the_gpu_exemption_covers_gpu_panels_only(exposition: str) -> None:
    dashboard = dc.load()
    gpu = [t for t in dc.targets(dashboard) if t.gpu]
    assert gpu, "the GPU memory panel is marked"
    assert all(name.startswith(dc.GPU_PREFIX) for t in gpu for name in t.names)
    values = {"__rate_interval": "1m", "bridge": ".*", "node": ".*"}

    def nothing(expr: str) -> dc.Series:
        return []

    rows = dc.check(dashboard, nothing, values, lambda t, s: None, gpu_exempt="no GPU")
    assert {r.target.panel for r in rows if r.exempt} == {t.panel for t in gpu}
    assert all(r.problem for r in rows if not r.target.gpu)
    # A panel marked GPU that reads other metrics is no exemption but a problem.
    marked = copy.deepcopy(dashboard)
    panel = next(p for p in dc.panels(marked) if p["title"] == "Tasks per second")
    panel["description"] = dc.GPU_MARK + " " + panel["description"]
    rows = dc.check(marked, fake_prometheus(exposition), values, lambda t, s: None, "no GPU")
    assert [p.split(":")[0] for p in dc.problems(rows)] == [
        f"Tasks per second / {legend}" for legend in ("ok", "failed", "answered dead by the bridge")
    ]


def test_an_empty_answer_a_nan_and_misordered_quantiles_are_problems() -> None:
    dashboard = dc.load()
    values = {"__rate_interval": "1m", "bridge": ".*", "node": ".*"}

    def answer(expr: str) -> dc.Series:
        match = re.search(r"histogram_quantile\(([0-9.]+)", expr)
        if match:  # P99 answers less than P90
            return [({}, {"0.5": 0.1, "0.9": 0.3, "0.99": 0.2}[match.group(1)])]
        if "alpcrun_pool_batches" in expr:
            return [({}, float("nan"))]
        return [] if "alpcrun_reconnects_total" in expr else [({}, 1.0)]

    problems = dc.problems(dc.check(dashboard, answer, values, lambda t, s: None, "no GPU"))
    assert problems == [
        "Batch latency P50 / P90 / P99 / P99: quantile 0.99 below quantile 0.9",
        "Pool load / batches held: not a finite value",
        "Reconnects, undecodable frames, dropped results / reconnects: "
        "no series (metrics ['alpcrun_reconnects_total'])",
    ]


def test_the_dashboard_imports_with_its_variables() -> None:
    dashboard = dc.load()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert set(dc.variable_queries(dashboard)) == {"bridge", "node"}
    for panel in dc.panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel.get("description"), f"{panel['title']} has no description"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    known = {"__rate_interval", "bridge", "node"}
    for target in dc.targets(dashboard):
        dc.substitute(target.expr, dict.fromkeys(known, "x"))  # raises on an unknown one
        assert 'instance=~"$bridge"' in target.expr, f"{target.panel}: not filtered by $bridge"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_metric_names_follow_prometheus_conventions(exposition: str) -> None:
    for name, (kind, help_text) in families(exposition).items():
        assert name.startswith("alpcrun_"), name
        assert help_text.strip(), f"{name} has no help text"
        assert name.endswith("_total") == (kind == "counter"), f"{name} is a {kind}"
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        assert not re.search(r"_(ms|milliseconds|kb|mb|bytes_used)$", name), name
    assert LATENCY_BUCKETS_S[0] <= 0.0001 and LATENCY_BUCKETS_S[-1] >= 60.0
    assert list(LATENCY_BUCKETS_S) == sorted(set(LATENCY_BUCKETS_S))
