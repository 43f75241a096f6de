"""The Grafana dashboard, checked for real: a Prometheus server (Debian's package)
scrapes a running bridge's ``/metrics`` every second while a short workload runs,
then every panel's PromQL goes through ``/api/v1/query`` and must answer a
sensible value. Run with ``-s`` to see the table of panels, queries and values.

Without the Prometheus binary this test fails; it never skips.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import dashboard_check as dc
from tests.support.bridge_support import assert_exactly_once, client_for, ray_get
from tests.support.prometheus import binary, prometheus

pytestmark = pytest.mark.timeout(120)

ACTORS = 2
# Why the GPU panels cannot answer here: the test session's Ray has no GPUs
# (tests/conftest.py starts it with num_gpus=0), so this pool has no GPU actor.
GPU_EXEMPT = "no GPU actors in this test's pool (the test session's Ray has num_gpus=0)"

# What the workload below must move (a rate above zero, or a count after it).
MOVED = {
    "alpcrun_tasks_processed_total",
    "alpcrun_tasks_failed_total",
    "alpcrun_tasks_dead_total",
    "alpcrun_batches_total",
    "alpcrun_batches_dead_total",
    "alpcrun_batch_latency_seconds_bucket",
    "alpcrun_node_bridge_tasks_processed_total",
    "alpcrun_node_bridge_tasks_failed_total",
    "alpcrun_shared_data_fetches_total",
    "alpcrun_shared_data_bytes_total",
    "alpcrun_shared_data_levels_total",
    "alpcrun_shared_data_decodes_total",
    "alpcrun_shared_data_level_max",
    "alpcrun_workers_registered",
    "alpcrun_node_bridge_workers_registered",
}
# Gauges with one right value for this pool of ACTORS fixed actors.
EXACT = {
    "alpcrun_pool_actors_alive": ACTORS,
    "alpcrun_pool_actors_target": ACTORS,
    "alpcrun_pool_actors_min": ACTORS,
    "alpcrun_pool_actors_max": ACTORS,
    "alpcrun_node_bridge_ready": 1,
}


def sensible(target: dc.Target, series: dc.Series) -> str | None:
    values = [v for _, v in series]
    names = target.names
    if min(values) < 0:
        return f"negative: {values}"
    for name, want in EXACT.items():
        if names == {name} and values != [want]:
            return f"expected {want}, got {values}"
    if names & MOVED and max(values) <= 0:
        return f"expected above 0 after the workload, got {values}"
    if "histogram_quantile" in target.expr and not 0 < max(values) <= 60:
        return f"a batch latency outside (0, 60] s: {values}"
    if target.legend == "decodes per level" and not 0 < values[0] <= ACTORS:
        return f"expected 0 < decodes per level <= {ACTORS} (one per actor), got {values}"
    return None


def workload(services: Any) -> int:
    """Tasks ok and failed, shared data at level 1, a batch answered dead (its
    shared-data level does not exist); returns how many tasks were sent."""
    payloads = [b"fail-1", b"fail-2", *[b"ok"] * 198]
    with client_for(services) as client:
        session = client.create_session(app_id="dashboard")
        session.set_shared_data(b"shared!", level=1)
        results = session.run(payloads, batch_size=10, use_shared_data=True, shared_level=1)
        session.close()
        missing = client.create_session(app_id="dashboard-dead")
        dead = missing.run([b"a", b"b"], batch_size=2, use_shared_data=True, shared_level=9)
        missing.close()
    assert_exactly_once(results, len(payloads))
    assert sum(r.ok for r in results) == len(payloads) - 2
    assert all(r.dead for r in dead)
    return len(payloads) + len(dead)


def test_every_panel_answers_from_a_real_prometheus(
    services: Any, bridge: Any, tmp_path: Path
) -> None:
    binary()  # fails the test at once without Prometheus
    # session_linger_s: the shared data stays held (its level on /metrics) till the end.
    handle = bridge("tests.support.bridge_handlers:echo", actors=ACTORS, health_port=0,
                    health_host="127.0.0.1", session_linger_s=300.0)  # fmt: skip
    port = ray_get(handle.status())["health_port"]
    target = f"127.0.0.1:{port}"
    dashboard = dc.load()
    with prometheus([target], tmp_path) as prom:
        assert prom.wait("the first scrape", lambda: bool(prom.query("alpcrun_batches_total"))), (
            f"Prometheus never scraped {target}:\n{prom.tail()}"
        )
        first_scrape = time.monotonic()
        sent = workload(services)
        after = prom.scrapes()
        assert prom.wait("two scrapes after the workload", lambda: prom.scrapes() >= after + 2)
        # The actors' decode counts reach /metrics within the bridge's 2 s reading period.
        prom.wait(
            "the actors' decodes", lambda: _value(prom, "alpcrun_shared_data_decodes_total") > 0
        )
        assert (
            _value(prom, "sum(alpcrun_tasks_processed_total) + sum(alpcrun_tasks_failed_total)")
            == sent
        )

        # Grafana's variables, as it would list them; every one must list something.
        values = {"__rate_interval": f"{math.ceil(time.monotonic() - first_scrape) + 3}s"}
        for name, (selector, label) in dc.variable_queries(dashboard).items():
            listed = prom.label_values(dc.substitute(selector, values), label)
            assert listed, f"dashboard variable ${name} lists nothing ({selector}, {label})"
            values[name] = "|".join(listed)
        rows = dc.check(dashboard, prom.query, values, sensible, gpu_exempt=GPU_EXEMPT)

    print(f"\nPrometheus scraped {target}; $__rate_interval = {values['__rate_interval']}")
    print(dc.table(rows))
    exempt = [r for r in rows if r.exempt]
    print(f"exempt: {len(exempt)} GPU panel target(s): {GPU_EXEMPT}")
    assert len(exempt) < len(rows) and all(r.target.gpu for r in exempt)
    assert not dc.problems(rows), "\n".join(dc.problems(rows))


def _value(prom: Any, expr: str) -> float:
    answer = prom.query(expr)
    return answer[0][1] if answer else 0.0
