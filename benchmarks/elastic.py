"""Scale-up and scale-down of the elastic pool on a fake autoscaling Ray cluster.

A burst of sessions goes through the bridge CLI (``--min-actors 0 --max-actors 3
--gpus-per-actor 1 --downscale-delay 5``) on Ray's real autoscaler with its fake
multi-node provider (GPU worker nodes 0..3, ``idle_timeout_minutes`` 0.05),
started with no GPU node. Measures the time from the first batch to the first
answer from zero actors, the scale-up time (first batch to the most GPU nodes)
and the scale-down time (last session closed to no GPU node), and plots
backlog, actors and nodes over time::

    PYTHONPATH=. python benchmarks/elastic.py --tasks 600 --task-ms 100 --sessions 3 \\
        --plot docs/elastic.png --json /tmp/elastic.json

The fake nodes are raylets on this machine: node start-up here is seconds, on a
cloud it is minutes (instance boot), so read the plot for the shape and the
bridge's own delays, not for cloud timings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.multinode_scenarios import autoscale


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = result["timeline"]
    t = [s["t"] for s in tl]
    backlog = [result["tasks"] - s["answered"] for s in tl]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, backlog, color="tab:gray", label="tasks not yet answered")
    top.set_ylabel("tasks")
    top.legend(loc="upper right")
    top.set_title(
        f"burst of {result['sessions']} session(s), {result['tasks']} x {result['task_ms']} ms "
        f"tasks: first answer {result['first_answer_s']} s, scale-up {result['scale_up_s']} s, "
        f"scale-down {result['scale_down_s']} s",
        fontsize=9,
    )
    bottom.step(t, [s["gpu_nodes"] for s in tl], where="post", label="GPU nodes", lw=2)
    bottom.step(t, [s["actors"] for s in tl], where="post", label="actors live")
    bottom.step(t, [s["pending"] for s in tl], where="post", label="actors pending", ls="--")
    bottom.step(t, [s["slots"] for s in tl], where="post", label="logical workers", ls=":")
    bottom.axvline(result["session_s"], color="k", lw=0.8)
    bottom.text(result["session_s"], 0.2, " sessions closed", fontsize=8)
    bottom.set_xlabel("seconds since the burst began")
    bottom.set_ylabel("count")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--task-ms", type=int, default=100)
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--plot", default=None, help="write the PNG here")
    p.add_argument("--json", default=None, help="write the measurements here")
    args = p.parse_args()
    result = autoscale(args.tasks, args.task_ms, args.sessions)
    summary = {k: v for k, v in result.items() if k != "timeline"}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
