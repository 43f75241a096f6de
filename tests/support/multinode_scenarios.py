"""Multi-node scenarios, each run in a process of its own by ``tests/faults/test_multinode.py``.

``python -m tests.support.multinode_scenarios three-nodes``: ``ray.cluster_utils.Cluster``
with three worker raylets on this machine (fake GPUs via ``num_gpus``): shared
data is copied once per node, not once per actor, and a node removed in the
middle of a session loses and doubles no task.

``python -m tests.support.multinode_scenarios autoscale``: the real autoscaler with the
fake multi-node provider (``tests/support/fake_autoscaler.py``), no GPU node at start:
the bridge CLI (``--min-actors 0 --max-actors 3 --gpus-per-actor 1``) becomes
ready, a session of slow tasks is answered exactly once while the cluster grows
to two or more GPU nodes, the GPU nodes are gone within 90 s after the session
closes, and the bridge exits 0 on SIGTERM.

Each prints one JSON line ``RESULT {...}`` with what it measured; any failed
check raises (exit code 1).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from typing import Any

from ray_alpcrun.client import TaskResult
from ray_alpcrun.config import DevServerConfig
from tests.support.bridge_support import async_client_for

FREE_PORTS = DevServerConfig(queue_port=0, central_cache_port=0, node_cache_port=0)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_once(results: list[TaskResult], n: int) -> None:
    counts = Counter(r.index for r in results)
    missing = sorted(set(range(n)) - set(counts))
    assert not missing, f"{len(missing)} task(s) lost, e.g. {missing[:5]}"
    assert max(counts.values()) == 1, "a task was answered twice"
    failed = [r for r in results if not r.ok]
    assert not failed, f"{len(failed)} task(s) failed, e.g. {failed[0].error}"


def gpu_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


client = async_client_for


# -- three nodes: shared data per node, a node removed mid-session -----------------


async def shared_copies() -> dict[str, Any]:
    """Six actors on three nodes read one shared object: count its copies."""
    import ray
    from ray.experimental import get_object_locations

    from ray_alpcrun.config import PoolConfig
    from ray_alpcrun.pool.actor_pool import ActorPool

    cfg = PoolConfig(num_actors=6, gpus_per_actor=1, cpus_per_actor=0.5, min_chunk=1)
    async with ActorPool("tests.support.elastic_handlers:shared_size", cfg) as pool:
        data = os.urandom(2 << 20)
        ref = pool.put_shared("s", 1, data)
        outs = await pool.run("s", [b"x"] * 120, shared=ref)
        assert all(o == (str(len(data)).encode(), None) for o in outs), outs[:3]
        status = await pool.status()
        decodes = sum(a.get("shared_decodes", 0) for a in status["actors"])
        actor_nodes = {a["node_id"] for a in status["actors"]}
        where = get_object_locations([ref.ref])[ref.ref]["node_ids"]
        driver_node = ray.get_runtime_context().get_node_id()
        copies_on_actor_nodes = len(set(where) - {driver_node})
    assert len(status["actors"]) == 6 and len(actor_nodes) == 3, status["actors"]
    assert copies_on_actor_nodes <= len(actor_nodes) < 6
    return {"actors": 6, "nodes": len(actor_nodes), "copies": copies_on_actor_nodes,
            "decodes": decodes}  # fmt: skip


async def answered(handle: Any, count: int, timeout_s: float = 120.0) -> None:
    """Wait (bounded) until the bridge's deployment counted ``count`` tasks answered."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while (status := await handle.status())["tasks_ok"] < count:
        assert loop.time() < end, f"{status['tasks_ok']} of {count} tasks answered in time"
        await asyncio.sleep(0.1)  # ok: polling the bridge's counters (no event to wait on)


async def node_removed(cluster: Any, nodes: list[Any], svc: Any) -> dict[str, Any]:
    import ray

    from ray_alpcrun.bridge.launch import start_bridge
    from tests.support.bridge_support import bridge_config

    config = bridge_config(svc, "tests.support.elastic_handlers:slow", actors=3, slots=3)
    pool = config.pool
    assert pool is not None
    from dataclasses import replace

    config = replace(config, pool=replace(pool, gpus_per_actor=1, cpus_per_actor=0.5))
    handle = start_bridge(config)
    await handle.wait_ready_async(90)
    n = 400
    async with client(svc) as c:
        session = await c.create_session(app_id="node-removed")
        run = asyncio.ensure_future(
            session.run([f"t{i}:50".encode() for i in range(n)], batch_size=10, timeout_s=240)
        )
        await answered(handle, n // 4)
        # The queue manager sees each node's logical workers under that node's name
        # (a node bridge registers once its first actor is handed over to it).
        hosting = {a.get("node_id") for a in (await handle.status())["actors"]["actors"]}
        expected = {f"mn-node-{i}" for i, x in enumerate(nodes) if x.node_id in hosting}
        for _ in range(600):
            names = {w.node for w in svc.core.workers.by_id.values()}
            if names >= expected:
                break
            await asyncio.sleep(0.1)  # ok: polling the queue manager's table
        # A node bridge killed mid-session is replaced; its batches come back.
        bridges = (await handle.status())["bridges"]
        assert bridges, "no node bridge started"
        killed_bridge = bridges[0]
        ray.kill(ray.get_actor(killed_bridge["name"]), no_restart=True)
        await answered(handle, n // 2)
        busy = {a.get("node_id") for a in (await handle.status())["actors"]["actors"]}
        victim = next(x for x in nodes if x.node_id in busy)
        cluster.remove_node(victim, allow_graceful=False)
        removed_at = (await handle.status())["tasks_ok"]
        results = await run
        await session.close()
    check_once(results, n)
    # The lost node's actors are found lost (its node bridge's end, a failed call)
    # and replaced in the background: the session may finish first.
    for _ in range(600):
        status = await handle.status()
        # An actor whose status call failed (lost, not yet replaced) has no node_id.
        hosts = {a.get("node_id") for a in status["actors"]["actors"]}
        if status["actor_restarts"] >= 1 and not hosts & {victim.node_id, None}:
            break
        await asyncio.sleep(0.1)  # ok: polling the bridge's status
    # /metrics: one series per bridge, labelled by its node; the sum without labels
    # is theirs (both read in one scrape).
    metrics = await handle.actor.metrics_text.remote()
    line = r'^alpcrun_node_bridge_tasks_processed_total\{node="([^"]+)"\} (\S+)$'
    per_node = dict(re.findall(line, metrics, re.MULTILINE))
    total = re.search(r"^alpcrun_tasks_processed_total (\S+)$", metrics, re.MULTILINE)
    assert total and float(total.group(1)) == sum(map(float, per_node.values())), metrics
    victim_name = f"mn-node-{nodes.index(victim)}"
    assert expected and names >= expected, (names, expected)
    assert status["bridges_replaced"] >= 1, status
    ran_on = Counter(r.value().decode().split("|")[1] for r in results)
    await handle.stop(drain=True)
    code, reason = await handle.run_ref
    assert code == 0, reason
    assert status["actor_restarts"] >= 1, status
    assert not {a.get("node_id") for a in status["actors"]["actors"]} & {victim.node_id, None}
    ray.kill(handle.actor)
    return {"tasks": n, "answered_before_removal": removed_at,
            "restarts": status["actor_restarts"], "nodes_used": len(ran_on),
            "worker_nodes": sorted(names), "expected_nodes": sorted(expected),
            "bridges_replaced": status["bridges_replaced"],
            "killed_bridge": killed_bridge["node"], "metric_nodes": sorted(per_node),
            "removed_node": victim_name}  # fmt: skip


def three_nodes() -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from ray_alpcrun.devserver import LocalServices

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 100 << 20,
            # A removed node is declared dead in seconds, not Ray's default ~30 s.
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
        },
    )
    try:
        nodes = []
        for i in range(3):
            # Raylets inherit os.environ at add_node: each node names its own bridge.
            os.environ["METALCORE_WORKER_NODE"] = f"mn-node-{i}"
            try:
                nodes.append(
                    cluster.add_node(num_cpus=2, num_gpus=2, object_store_memory=100 << 20)
                )
            finally:
                del os.environ["METALCORE_WORKER_NODE"]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        out = {"shared": asyncio.run(shared_copies())}
        with LocalServices(FREE_PORTS) as svc:
            out["node_removed"] = asyncio.run(node_removed(cluster, nodes, svc))
        return out
    finally:
        ray.shutdown()
        cluster.shutdown()


# -- autoscaling: from zero GPU nodes to several and back ---------------------------


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return dict(json.loads(r.read()))


def _ready(port: int) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status == 200, r.read().decode()
    except Exception as exc:  # not up yet, or 503
        return False, str(exc)


GPU_WORKER = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
              "max_workers": 3}  # fmt: skip


def autoscale(
    tasks: int = 600, task_ms: int = 100, sessions: int = 1, batch: int = 10
) -> dict[str, Any]:
    import ray

    from ray_alpcrun.devserver import LocalServices
    from tests.support.fake_autoscaler import FakeAutoscalingCluster, free_port

    cluster = FakeAutoscalingCluster(
        {"gpu_worker": GPU_WORKER},
        head_cpus=0,
        idle_timeout_minutes=0.05,
    )
    bridge: subprocess.Popen[bytes] | None = None
    out: dict[str, Any] = {}
    timeline: list[dict[str, Any]] = []
    try:
        address = cluster.start()
        ray.init(address=address, log_to_driver=False)
        with LocalServices(FREE_PORTS) as svc:
            port = free_port()
            env = dict(os.environ, METALCORE_API_KEY=svc.api_key, PYTHONPATH=ROOT)
            cmd = [
                sys.executable, "-m", "ray_alpcrun.bridge", "--ray-address", address,
                "--handler", "tests.support.elastic_handlers:slow",
                "--min-actors", "0", "--max-actors", "3", "--gpus-per-actor", "1",
                "--downscale-delay", "5", "--health-port", str(port), "--health-host", "127.0.0.1",
                "--queue", svc.queue_address, "--cache", svc.node_cache_address,
                "--proto-package", svc.proto_package or "",
            ]  # fmt: skip
            bridge = subprocess.Popen(cmd, env=env, cwd=ROOT)
            t0 = time.monotonic()
            while not (ready := _ready(port))[0]:
                assert bridge.poll() is None, f"bridge exited {bridge.returncode}"
                assert time.monotonic() - t0 < 120, f"bridge not ready: {ready[1]}"
                time.sleep(0.2)  # ok: polls a subprocess's HTTP readiness (bounded)
            out["ready_after_s"] = round(time.monotonic() - t0, 1)
            out["ready_text"] = ready[1]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                metrics = r.read().decode()
            for gauge in ("alive", "pending", "target"):
                assert f"alpcrun_pool_actors_{gauge} 0" in metrics, metrics
            assert gpu_nodes() == 0
            burst = _burst(svc, port, tasks, task_ms, batch, sessions, timeline)
            out.update(asyncio.run(burst))
            assert out["max_gpu_nodes"] >= 2, out
            bridge.send_signal(signal.SIGTERM)
            out["bridge_exit"] = bridge.wait(timeout=60)
            assert out["bridge_exit"] == 0
    finally:
        if bridge is not None and bridge.poll() is None:
            bridge.kill()
        ray.shutdown()
        left = cluster.stop()
        out["stray_processes"] = len(left)
    out["timeline"] = timeline
    assert not left, f"processes left behind: {left}"
    # /status showed the pool asking for actors Ray could not place yet, and the target.
    assert any(x["pending"] > 0 for x in timeline) and max(x["target"] for x in timeline) == 3
    return out


async def _burst(
    svc: Any,
    port: int,
    n: int,
    task_ms: int,
    batch: int,
    sessions: int,
    timeline: list[dict[str, Any]],
) -> dict[str, Any]:
    """``sessions`` sessions at once, ``n`` slow tasks in all; samples the bridge's
    /status and the cluster's GPU nodes every 0.5 s into ``timeline``."""
    t0 = time.monotonic()
    first_answer: list[float] = []
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            try:
                status = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{port}/status")
            except Exception:
                status = {}
            scaling = status.get("scaling", {})
            timeline.append({
                "t": round(time.monotonic() - t0, 2),
                "gpu_nodes": await asyncio.to_thread(gpu_nodes),
                "actors": scaling.get("live", 0), "pending": scaling.get("pending", 0),
                "target": scaling.get("target", 0), "batches": scaling.get("batches", 0),
                "slots": len(status.get("slots", [])), "answered": status.get("tasks_ok", 0),
                "node_bridges": sum(not b["dead"] for b in status.get("bridges", [])),
                "stopped_empty": status.get("bridges_stopped_empty", 0),
            })  # fmt: skip
            if not first_answer and status.get("tasks_ok", 0) > 0:
                first_answer.append(time.monotonic() - t0)
            await asyncio.sleep(0.5)  # ok: sampling period

    sampler = asyncio.ensure_future(sample())
    share = [n // sessions + (1 if k < n % sessions else 0) for k in range(sessions)]

    async def one(k: int, count: int) -> list[TaskResult]:
        async with client(svc) as c:
            session = await c.create_session(app_id=f"burst-{k}")
            payloads = [f"s{k}t{i}:{task_ms}".encode() for i in range(count)]
            results = await session.run(payloads, batch_size=batch, timeout_s=300)
            await session.close()
        check_once(results, count)
        return results

    per_session = await asyncio.gather(*(one(k, c) for k, c in enumerate(share)))
    results = [r for rs in per_session for r in rs]
    closed_at = time.monotonic() - t0
    while time.monotonic() - t0 - closed_at < 90:  # the autoscaler has no event to wait on
        if await asyncio.to_thread(gpu_nodes) == 0:
            break
        await asyncio.sleep(0.5)  # ok: polling period
    gone_after = time.monotonic() - t0 - closed_at
    await asyncio.sleep(1.0)  # ok: one more sample after the last node went
    for _ in range(180):  # the node bridges' empty-node delay: nothing to wait on
        if not timeline or not timeline[-1]["node_bridges"]:
            break
        await asyncio.sleep(0.5)  # ok: polling period
    stop_sampling.set()
    await sampler
    max_nodes = max((s["gpu_nodes"] for s in timeline), default=0)
    full = next((s["t"] for s in timeline if s["gpu_nodes"] >= max_nodes), None)
    assert await asyncio.to_thread(gpu_nodes) == 0, f"GPU nodes still up {gone_after:.0f} s after"
    return {
        "tasks": n, "task_ms": task_ms, "sessions": sessions,
        "first_answer_s": round(first_answer[0], 1) if first_answer else None,
        "session_s": round(closed_at, 1), "max_gpu_nodes": max_nodes,
        "scale_up_s": full, "scale_down_s": round(gone_after, 1),
        "workers_used": len({r.value().decode().split("|")[1] for r in results}),
        "max_node_bridges": max((s["node_bridges"] for s in timeline), default=0),
        "node_bridges_left": timeline[-1]["node_bridges"] if timeline else None,
        "node_bridges_stopped_empty": timeline[-1]["stopped_empty"] if timeline else 0,
    }  # fmt: skip


def main() -> None:
    scenario, *numbers = sys.argv[1:]
    # three-nodes | autoscale [TASKS [TASK_MS [SESSIONS]]]
    result = three_nodes() if scenario == "three-nodes" else autoscale(*map(int, numbers))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
