"""The interleaved benchmark's arithmetic and the cluster systems' environment,
without running any system."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import interleave, run, systems


def row(system: str, batch: int, round_: int, rate: float) -> dict[str, Any]:
    return {"system": system, "batch_size": batch, "round": round_, "tasks_per_s": rate}


def test_order_takes_every_system_in_turn_round_after_round() -> None:
    assert interleave.order(["reference", "bridge", "bridge-cluster"], 2) == [
        (0, "reference"),
        (0, "bridge"),
        (0, "bridge-cluster"),
        (1, "reference"),
        (1, "bridge"),
        (1, "bridge-cluster"),
    ]


def test_spread_is_median_with_range() -> None:
    s = interleave.spread([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.low, s.high, s.count) == (2.5, 1.0, 10.0, 4)
    assert interleave.spread([1500.0, 900.0, 1200.0]).format() == "1,200 (900-1,500)"
    with pytest.raises(ValueError):
        interleave.spread([])


def test_ratio_is_per_round_then_median_and_only_rounds_with_both() -> None:
    rows = [
        row("reference", 1, 0, 1000.0),
        row("bridge", 1, 0, 900.0),
        row("reference", 1, 1, 2000.0),
        row("bridge", 1, 1, 1600.0),
        row("reference", 1, 2, 1000.0),
        row("bridge", 1, 2, 1000.0),
        row("reference", 1, 3, 1000.0),  # the bridge's row of round 3 is missing
        row("bridge", 100, 0, 5.0),  # another batch size
    ]
    s = interleave.ratio_spread(rows, "bridge", "reference", 1)
    assert s is not None
    # Per round 0.9, 0.8, 1.0: the ratio of the medians (1150 / 1000) would differ.
    assert (s.median, s.low, s.high, s.count) == (0.9, 0.8, 1.0, 3)
    assert interleave.ratio_spread(rows, "bridge", "reference", 100) is None


def test_row_tasks_cover_the_minimum_in_whole_batches() -> None:
    n = interleave.row_tasks(1000.0, 3.0, 100)
    assert n % 100 == 0 and n >= 3000
    assert interleave.row_tasks(0.0, 3.0, 10) == 10  # at least one batch


def test_summary_tables_name_systems_batches_and_ratios() -> None:
    rows = []
    for r in range(3):
        rows += [row("reference", 1, r, 1000.0), row("bridge", 1, r, 900.0 + r)]
        rows += [row("bridge-cluster", 1, r, 450.0), row("reference", 100, r, 5e4)]
    text = interleave.summary(rows)
    assert "| bridge-cluster | 450 (450-450) x3 |" in text
    assert "| bridge / reference | 0.90 (0.90-0.90) |" in text
    assert "| bridge-cluster / bridge | 0.50 (0.50-0.50) |" in text
    assert "bridge-cluster / bridge-cluster-one" not in text  # not measured


def test_cluster_systems_are_known_and_coloured() -> None:
    assert {"bridge-cluster", "bridge-cluster-one"} <= set(run.SYSTEMS)
    assert set(run.CLUSTER_BRIDGES) <= set(run.COLOURS)


def test_cluster_env_drops_this_process_ray_session_and_node_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A test session's ray.init leaves RAY_AUTH_MODE=token behind; the cluster has no token.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.setenv("METALCORE_WORKER_NODE", "here")
    monkeypatch.setenv("METALCORE_WORKER_POD", "p")
    env = systems.cluster_env("key", "/tmp/x")
    assert env["RAY_AUTH_MODE"] == "disabled" and env["RAY_TMPDIR"] == "/tmp/x"
    assert env["METALCORE_API_KEY"] == "key" and env["OMP_NUM_THREADS"] == "1"
    assert not {"RAY_ADDRESS", "METALCORE_WORKER_NODE", "METALCORE_WORKER_POD"} & set(env)
