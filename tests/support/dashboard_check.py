"""The check of the Grafana dashboard (``deploy/grafana/ray_alpcrun.json``) against
metrics: every panel's every PromQL expression must answer at least one series
with a finite value that the test finds sensible.

It takes the query as a function, so one checker serves the real Prometheus of
``tests/integration/test_dashboard.py`` and the fake of the unit tests. Panels
whose description starts with :data:`GPU_MARK` may be exempt (no GPU actors),
and only those: a marked panel that reads anything but ``alpcrun_gpu_*`` is a
problem in itself.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "ray_alpcrun.json"
GPU_MARK = "GPU actors only:"
GPU_PREFIX = "alpcrun_gpu_"

Series = list[tuple[dict[str, str], float]]
Query = Callable[[str], Series]
Sensible = Callable[["Target", Series], "str | None"]

_NAME = re.compile(r"\balpcrun_[a-z0-9_]+")
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_QUANTILE = re.compile(r"histogram_quantile\(\s*([0-9.]+)")


@dataclass(frozen=True)
class Target:
    """One PromQL expression of one panel."""

    panel: str
    legend: str
    expr: str
    gpu: bool  # its panel is marked GPU_MARK

    @property
    def names(self) -> set[str]:
        return metric_names(self.expr)


@dataclass
class Row:
    """What one target answered, and what is wrong with it (``problem``), if anything."""

    target: Target
    query: str
    series: Series
    problem: str | None = None
    exempt: str | None = None

    @property
    def shown(self) -> str:
        if not self.series:
            return "(none)"
        return ", ".join(f"{_labels(labels)}{value:.4g}" for labels, value in self.series[:4])


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that draws something (rows' nested panels included)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from (p for p in panel.get("panels", []) if p.get("type") != "row")
        else:
            yield panel


def targets(dashboard: dict[str, Any]) -> list[Target]:
    return [
        Target(
            panel=panel.get("title", "?"),
            legend=target.get("legendFormat", ""),
            expr=target["expr"],
            gpu=str(panel.get("description", "")).startswith(GPU_MARK),
        )
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def metric_names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def substitute(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's variables (``$name``, ``${name}``) replaced; an
    unknown one raises ``KeyError``."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"variable ${name} of {expr!r} has no value")
        return values[name]

    return _VARIABLE.sub(value, expr)


def variable_queries(dashboard: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The query variables as ``name -> (series selector, label)``, from their
    ``label_values(selector, label)`` definitions."""
    out = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        if match is None:
            raise ValueError(f"variable {var['name']}: not label_values(...): {query!r}")
        out[var["name"]] = (match.group(1), match.group(2))
    return out


def check(
    dashboard: dict[str, Any],
    query: Query,
    values: dict[str, str],
    sensible: Sensible,
    gpu_exempt: str | None = None,
) -> list[Row]:
    """Run every target; ``gpu_exempt`` (why GPU panels cannot answer here) exempts
    the GPU-marked ones from answering."""
    rows = []
    for target in targets(dashboard):
        text = substitute(target.expr, values)
        row = Row(target, text, query(text))
        if target.gpu and not all(n.startswith(GPU_PREFIX) for n in target.names):
            row.problem = f"marked {GPU_MARK!r} but reads {sorted(target.names)}"
        elif target.gpu and gpu_exempt:
            row.exempt = gpu_exempt
        elif not row.series:
            row.problem = f"no series (metrics {sorted(target.names)})"
        elif not all(math.isfinite(v) for _, v in row.series):
            row.problem = "not a finite value"
        else:
            row.problem = sensible(target, row.series)
        rows.append(row)
    _check_quantiles(rows)
    return rows


def _check_quantiles(rows: list[Row]) -> None:
    """Within a panel, a higher quantile is never below a lower one."""
    by_panel: dict[str, list[tuple[float, Row]]] = {}
    for row in rows:
        match = _QUANTILE.search(row.target.expr)
        if match and row.series and row.problem is None:
            by_panel.setdefault(row.target.panel, []).append((float(match.group(1)), row))
    for quantiles in by_panel.values():
        quantiles.sort(key=lambda qr: qr[0])
        for (q_low, low), (q_high, high) in itertools.pairwise(quantiles):
            if max(v for _, v in high.series) < max(v for _, v in low.series):
                high.problem = f"quantile {q_high} below quantile {q_low}"


def problems(rows: list[Row]) -> list[str]:
    return [f"{r.target.panel} / {r.target.legend}: {r.problem}" for r in rows if r.problem]


def table(rows: list[Row]) -> str:
    lines = ["panel | legend | value | PromQL", "---|---|---|---"]
    for r in rows:
        value = f"exempt: {r.exempt}" if r.exempt else r.shown
        if r.problem:
            value += f"  <-- {r.problem}"
        lines.append(f"{r.target.panel} | {r.target.legend} | {value} | `{r.target.expr}`")
    return "\n".join(lines)


def _labels(labels: dict[str, str]) -> str:
    shown = {k: v for k, v in labels.items() if k not in ("instance", "job")}
    if not shown:
        return ""
    return "{" + ",".join(f"{k}={v}" for k, v in sorted(shown.items())) + "} "
