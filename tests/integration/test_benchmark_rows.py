"""The benchmark's machinery on a tiny case: row schema and output files, never speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import run

EXPECTED_TYPES = {
    "system": str,
    "workload": str,
    "batch_size": int,
    "workers": int,
    "tasks_per_s": float,
    "p50_batch_ms": float,
    "p99_batch_ms": float,
    "peak_pss_mb": float,
    "shared_fetches": int,
}


def check_row(row: dict[str, object]) -> None:
    assert tuple(row) == run.ROW_KEYS
    assert set(row) == set(EXPECTED_TYPES)
    for key, kind in EXPECTED_TYPES.items():
        assert type(row[key]) is kind, (key, row[key])
    json.dumps(row)  # plain JSON values only


def test_make_row_has_exactly_the_keys() -> None:
    case = run.Case("bridge", "shared", 4, (100,))
    row = run.make_row(case, 100, 1234.5, [0.002, 0.001, 0.003], 512.25, 1)
    check_row(row)
    assert row["p50_batch_ms"] == 2.0
    assert row["p99_batch_ms"] == 3.0
    assert (row["system"], row["workload"], row["workers"]) == ("bridge", "shared", 4)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert run.percentile(values, 50) == 50.0
    assert run.percentile(values, 99) == 99.0
    assert run.percentile([7.0], 99) == 7.0


def test_quick_matrix_holds_every_case_the_targets_name() -> None:
    have = {(c.system, c.workload, c.workers, b) for c in run.quick_cases() for b in c.batch_sizes}
    wanted = {
        ("reference", "noop", 1, 100),
        ("reference", "noop", 1, 1000),
        ("bridge", "noop", 1, 100),
        ("bridge", "noop", 1, 1000),
        ("bridge-calls", "noop", 1, 1),
        ("bridge-calls", "noop", 1, 100),
        ("bridge-calls", "noop", 1, 1000),
        ("reference", "cpu", 1, 100),
        ("replicas", "cpu", 2, 100),
        ("bridge", "cpu", 2, 100),
        ("bridge", "shared", 1, 100),
        ("bridge", "shared", 4, 100),
        ("replicas", "shared", 1, 100),
        ("replicas", "shared", 4, 100),
    }
    assert wanted <= have


def test_reference_noop_case_end_to_end(tmp_path: Path) -> None:
    """Devserver and one reference worker as processes, a few tasks, real rows."""
    case = run.Case("reference", "noop", 1, (10,))
    budget = run.Budget(latency_s=0.0, min_rounds=2, max_rounds=2, task_scale=0.01)
    with open(tmp_path / "systems.log", "a") as log:
        rows = run.run_case(case, budget, log, shared=None)
    assert len(rows) == 1
    row = rows[0]
    check_row(row)
    assert (row["system"], row["workload"], row["batch_size"], row["workers"]) == (
        "reference",
        "noop",
        10,
        1,
    )
    assert row["tasks_per_s"] > 0 and row["p99_batch_ms"] >= row["p50_batch_ms"] > 0
    assert row["peak_pss_mb"] > 0  # the worker process was sampled
    assert row["shared_fetches"] == 0

    pytest.importorskip("matplotlib")
    out = tmp_path / "results.json"
    run.write_outputs(rows, out)
    assert json.loads(out.read_text()) == rows
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0].startswith("| system | workload | batch_size")
    assert len(table) == 3
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_has_a_memory_panel_for_shared_data_and_a_colour_per_system(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = []
    for system in run.COLOURS:
        for k, batch in ((1, 10), (1, 100), (4, 100)):
            for workload in ("noop", "shared"):
                case = run.Case(system, workload, k, (batch,))
                rows.append(run.make_row(case, batch, 100.0 * k, [0.001, 0.002], 50.0 * k, 1))
    out = tmp_path / "plot.png"
    run.plot(rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(run.BRIDGE_PATHS) <= set(run.COLOURS)


def test_devserver_reports_the_node_names_workers_registered_under(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``worker_nodes`` (what a bridge-cluster row records) names the node a worker
    gave at registration: here a reference worker's ``METALCORE_WORKER_NODE``."""
    from benchmarks import systems

    monkeypatch.setenv("METALCORE_WORKER_NODE", "bench-node-x")
    with (
        open(tmp_path / "systems.log", "a") as log,
        systems.devserver("key", run.MAX_MESSAGE_BYTES, log) as dev,
    ):
        assert dev.stats()["worker_nodes"] == {}
        handler = run.HANDLERS["noop"]
        with systems.reference_workers(1, handler, dev, "key", run.MAX_MESSAGE_BYTES, log):
            assert dev.stats()["worker_nodes"] == {"bench-node-x": 1}
