"""A Ray cluster of raylets on this machine, in a process of its own.

    python benchmarks/cluster_host.py --workers 1 --worker-cpus 2

Starts ``ray.cluster_utils.Cluster``: a head with ``--head-cpus`` (0) CPUs and
``--workers`` worker nodes of ``--worker-cpus`` CPUs each; worker node ``i`` is
started with ``METALCORE_WORKER_NODE=<--node-prefix>-<i>`` in its environment (a
raylet and the processes it starts inherit ``os.environ`` as it is when the node is
added). Prints one JSON line, ``{"address": GCS address, "nodes": {node id: name}}``,
then reads commands, one a line, each answered with one JSON line (the chaos run,
``benchmarks/chaos_cluster.py``, replaces worker nodes with them):

* ``add NAME``: a worker node like the others, named ``NAME``: ``{"node_id", "name"}``;
* ``remove NODE_ID``: that worker node's raylet killed, as when a machine is lost
  (``allow_graceful=False``): ``{"removed": NODE_ID}``, or ``{"error": ...}``.

At end of input (stdin closed) or SIGTERM it shuts the cluster down.

This process never joins the cluster as a driver: ``ray.init`` beside a ``Cluster``
in one process would share Ray's global state with it. The caller sets the
environment the raylets get (``benchmarks/systems.py``: ``PYTHONPATH``, thread
pinning, ``RAY_AUTH_MODE=disabled``, a private ``RAY_TMPDIR`` so that Ray's
``ray_current_cluster`` file of this cluster is not the one other Rays on the
machine read).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from types import FrameType
from typing import Any

NODE_ENV = "METALCORE_WORKER_NODE"


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def add_worker(cluster: Any, name: str, **node_args: Any) -> Any:
    """``cluster.add_node`` with ``METALCORE_WORKER_NODE=name`` in the raylet's environment."""
    before = os.environ.get(NODE_ENV)
    os.environ[NODE_ENV] = name
    try:
        return cluster.add_node(**node_args)
    finally:
        if before is None:
            del os.environ[NODE_ENV]
        else:
            os.environ[NODE_ENV] = before


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1, help="worker nodes (default: 1)")
    p.add_argument("--worker-cpus", type=float, default=2, help="CPUs per worker node")
    p.add_argument("--head-cpus", type=float, default=0, help="CPUs of the head (default: 0)")
    p.add_argument("--object-store-mb", type=int, default=150, help="object store per node")
    p.add_argument("--node-prefix", default="bench-worker", help="METALCORE_WORKER_NODE prefix")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _stop)

    from ray.cluster_utils import Cluster

    store = args.object_store_mb << 20
    # The head (the bridge CLI's node) keeps no worker-node name of ours.
    os.environ.pop(NODE_ENV, None)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": args.head_cpus, "object_store_memory": store},
    )
    try:
        nodes = {}
        for i in range(args.workers):
            name = f"{args.node_prefix}-{i}"
            node = add_worker(cluster, name, num_cpus=args.worker_cpus, object_store_memory=store)
            nodes[node.node_id] = name
        print(json.dumps({"address": cluster.address, "nodes": nodes}), flush=True)
        worker_args = {"num_cpus": args.worker_cpus, "object_store_memory": store}
        for line in sys.stdin:  # until the parent closes our stdin (or SIGTERM)
            print(json.dumps(command(cluster, line.split(), worker_args)), flush=True)
    finally:
        cluster.shutdown()
    return 0


def command(cluster: Any, words: list[str], worker_args: dict[str, Any]) -> dict[str, Any]:
    """One ``add NAME`` / ``remove NODE_ID`` command (see the module docstring)."""
    if len(words) == 2 and words[0] == "add":
        try:
            node = add_worker(cluster, words[1], **worker_args)
        except Exception as exc:  # a raylet that did not start (a loaded machine)
            return {"error": f"add {words[1]}: {exc}"}
        return {"node_id": node.node_id, "name": words[1]}
    if len(words) == 2 and words[0] == "remove":
        victim = next((n for n in cluster.worker_nodes if n.node_id == words[1]), None)
        if victim is None:
            return {"error": f"no worker node {words[1]}"}
        cluster.remove_node(victim, allow_graceful=False)
        return {"removed": words[1]}
    return {"error": f"unknown command {' '.join(words)!r}"}


if __name__ == "__main__":
    raise SystemExit(main())
