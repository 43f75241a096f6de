"""Health probes and metrics read over HTTP from a running bridge."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.support.bridge_support import bridge_config, client_for, ray_get

pytestmark = pytest.mark.timeout(120)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_probes_and_metrics_reflect_the_bridge(services: Any, bridge: Any) -> None:
    handle = bridge(
        "tests.support.bridge_handlers:echo", actors=2, health_port=0, health_host="127.0.0.1"
    )
    port = ray_get(handle.status())["health_port"]
    assert get(port, "/healthz")[0] == 200
    code, body = get(port, "/readyz")
    assert code == 200 and "registered" in body
    with client_for(services) as client:
        session = client.create_session(app_id="metrics")
        session.set_shared_data(b"shared!", level=1)
        payloads = [b"fail-1", *[b"ok"] * 49]
        results = session.run(payloads, batch_size=10, use_shared_data=True, shared_level=1)
        session.close()
    assert sum(r.ok for r in results) == 49
    code, text = get(port, "/metrics")
    assert code == 200
    assert metric(text, "alpcrun_tasks_processed_total") == 49
    assert metric(text, "alpcrun_tasks_failed_total") == 1
    assert metric(text, "alpcrun_batches_total") == 5
    assert metric(text, "alpcrun_shared_data_fetches_total") == 1
    assert metric(text, "alpcrun_shared_data_bytes_total") == len(b"shared!")
    assert metric(text, "alpcrun_batch_latency_seconds_count") == 5
    assert metric(text, "alpcrun_workers_registered") == 2
    assert metric(text, "alpcrun_actor_restarts_total") == 0
    assert 'alpcrun_batch_latency_seconds_bucket{le="+Inf"} 5' in text
    assert services.api_key not in text
    assert get(port, "/nope")[0] == 404
    ray_get(handle.actor.stop.remote(True))
    assert tuple(ray_get(handle.run_ref)) == (0, "")


def test_readiness_is_false_until_registered(services: Any, ray_session: Any) -> None:
    from ray_alpcrun.bridge.launch import start_bridge

    # Nothing listens on port 9 of loopback: the bridge stays unregistered.
    config = bridge_config(services, "tests.support.bridge_handlers:echo", 1, health_port=0,
                           health_host="127.0.0.1", backoff_max_s=0.5)  # fmt: skip
    from dataclasses import replace

    config = replace(config, services=replace(config.services, queue_address="127.0.0.1:9"))
    handle = start_bridge(config)
    try:
        status = ray_get(handle.status())
        while status["health_port"] in (None, 0):
            status = ray_get(handle.status())
        port = status["health_port"]
        assert get(port, "/healthz")[0] == 200
        code, body = get(port, "/readyz")
        assert code == 503 and ("not registered" in body or "starting" in body)
    finally:
        ray_get(handle.stop(drain=False))
        ray_get(handle.run_ref)
