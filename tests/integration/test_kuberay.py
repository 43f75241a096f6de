"""The KubeRay manifest: the fields that make the bridge work on Kubernetes.

No cluster is needed: the YAML is parsed and the fields that matter are
checked -- a RayCluster with the bridge command on the head and a bridge on
every node (``--bridges per-node``), a GPU worker group that autoscales, the
API key from a Secret, node and pod names from the downward API (the head's
bridge sidecar and every worker group's Ray container, whose node bridge
inherits them), a node-cache sidecar in every pod at ``localhost:3337``, probes
on the bridge's health endpoints, and the KubeRay conventions these rely on
(Ray container first, string rayStartParams, a shared /tmp/ray).
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deploy_checks import (
    PLANTED_SECRETS,
    RAY_METRICS_PORT,
    parse_bridge_args,
    secret_findings,
)

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "kuberay" / "raycluster.yaml"
# ALPCRUN.CH's node cache: a sidecar of every pod that runs a bridge.
NODE_CACHE = "node-cache"
NODE_CACHE_PORT = 3337

# Fields of a core/v1 Container and Probe that the manifest may use: a typo
# (e.g. `livenesProbe`) would otherwise be dropped silently by the API server.
CONTAINER_FIELDS = {
    "name", "image", "imagePullPolicy", "command", "args", "workingDir", "env", "envFrom",
    "ports", "resources", "volumeMounts", "livenessProbe", "readinessProbe", "startupProbe",
    "lifecycle", "securityContext",
}  # fmt: skip
PROBE_FIELDS = {
    "httpGet", "exec", "tcpSocket", "grpc", "initialDelaySeconds", "periodSeconds",
    "timeoutSeconds", "successThreshold", "failureThreshold", "terminationGracePeriodSeconds",
}  # fmt: skip


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    [rc] = [d for d in documents() if d.get("kind") == "RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    return rc


def head_pod(cluster: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    return spec


def bridge_container(cluster: dict[str, Any]) -> dict[str, Any]:
    hits = [
        c
        for c in head_pod(cluster)["containers"]
        if "-m ray_alpcrun.bridge" in " ".join(c.get("command", []) + c.get("args", []))
    ]
    assert len(hits) == 1, "exactly one head container runs the bridge"
    return hits[0]


def bridge_script(cluster: dict[str, Any]) -> str:
    c = bridge_container(cluster)
    assert c["command"] == ["/bin/bash", "-c"]
    [script] = c["args"]
    assert isinstance(script, str)
    return script


def bridge_argv(cluster: dict[str, Any]) -> list[str]:
    """The flags after ``python -m ray_alpcrun.bridge`` in the sidecar's script."""
    script = bridge_script(cluster)
    tail = script.split("exec python -m ray_alpcrun.bridge", 1)[1].replace("\\\n", " ")
    line = tail.split("\n", 1)[0]
    return [a for a in shlex.split(line) if not a.startswith("$")]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_manifest_kinds(cluster: dict[str, Any]) -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["ConfigMap", "RayCluster"], "no Secret objects in the example"
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


def test_ray_container_is_first_and_start_params_are_strings(cluster: dict[str, Any]) -> None:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        first = group["template"]["spec"]["containers"][0]
        assert "ray_alpcrun.bridge" not in str(first), "KubeRay runs `ray start` in container 0"
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), params
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_gpu_worker_group_autoscales(cluster: dict[str, Any]) -> None:
    gpu_groups = []
    for group in cluster["spec"]["workerGroupSpecs"]:
        ray = group["template"]["spec"]["containers"][0]
        limits = ray["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group)
            # Starts with no GPU pod: the elastic pool's pending actors make it grow.
            assert group["minReplicas"] == 0 < group["maxReplicas"]
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            assert "NVIDIA_VISIBLE_DEVICES" not in env_of(ray)
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    # The autoscaler can add enough GPU pods for the whole pool.
    argv = bridge_argv(cluster)
    gpus_per_actor = float(flag(argv, "--gpus-per-actor"))
    gpus_per_pod = [
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in gpu_groups
    ]
    capacity = sum(g["maxReplicas"] * n for g, n in zip(gpu_groups, gpus_per_pod, strict=True))
    assert 1 <= gpus_per_actor <= max(gpus_per_pod)
    assert int(flag(argv, "--max-actors")) * gpus_per_actor <= capacity
    assert int(flag(argv, "--min-actors")) == 0
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


def test_bridge_joins_the_head_ray(cluster: dict[str, Any]) -> None:
    argv = bridge_argv(cluster)
    assert flag(argv, "--ray-address") == "auto"
    # `auto` reads /tmp/ray/ray_current_cluster: the bridge and ray-head must
    # mount the same volume there, named as KubeRay's autoscaler expects.
    pod = head_pod(cluster)
    ray_head = pod["containers"][0]
    mounts = {
        c["name"]: {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        for c in (ray_head, bridge_container(cluster))
    }
    volume = mounts[ray_head["name"]]["/tmp/ray"]
    assert mounts[bridge_container(cluster)["name"]]["/tmp/ray"] == volume == "ray-logs"
    [vol] = [v for v in pod["volumes"] if v["name"] == volume]
    assert "emptyDir" in vol
    # The sidecar waits for the head instead of crash-looping, then execs the
    # bridge so that SIGTERM reaches it.
    script = bridge_script(cluster)
    assert "ray health-check" in script and "exec python -m ray_alpcrun.bridge" in script


def test_bridge_flags_parse_with_the_bridge_cli(cluster: dict[str, Any]) -> None:
    args = parse_bridge_args(bridge_argv(cluster))
    assert args.ray_address == "auto"
    assert args.health_port is not None


def test_bridge_script_is_valid_bash(cluster: dict[str, Any]) -> None:
    subprocess.run(["bash", "-n", "-c", bridge_script(cluster)], check=True, timeout=10)


def test_api_key_from_a_secret_identity_from_the_downward_api(cluster: dict[str, Any]) -> None:
    env = env_of(bridge_container(cluster))
    key = env["METALCORE_API_KEY"]
    assert "value" not in key
    ref = key["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    assert env["METALCORE_WORKER_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["METALCORE_WORKER_POD"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_config_map_holds_only_non_secret_settings(cluster: dict[str, Any]) -> None:
    refs = [s["configMapRef"]["name"] for s in bridge_container(cluster).get("envFrom", [])]
    maps = {d["metadata"]["name"]: d for d in documents() if d["kind"] == "ConfigMap"}
    assert refs and all(r in maps for r in refs)
    for name in refs:
        data = maps[name]["data"]
        assert "METALCORE_API_KEY" not in data
        assert all(k.startswith("METALCORE_") for k in data), data


def test_probes_hit_the_bridge_health_endpoints(cluster: dict[str, Any]) -> None:
    c = bridge_container(cluster)
    port = int(flag(bridge_argv(cluster), "--health-port"))
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    expected = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert named.get(get["port"], get["port"]) == port, probe
        assert set(c[probe]) <= PROBE_FIELDS, probe
    # One network namespace per pod: the health port must be free there.
    taken = {
        p["containerPort"]
        for x in head_pod(cluster)["containers"]
        if x is not c
        for p in x["ports"]
    }
    assert port not in taken | {RAY_METRICS_PORT}


def test_termination_grace_covers_the_drain(cluster: dict[str, Any]) -> None:
    drain_s = float(flag(bridge_argv(cluster), "--drain-timeout"))
    assert head_pod(cluster)["terminationGracePeriodSeconds"] > drain_s


def head_pre_stop(cluster: dict[str, Any]) -> str:
    command = head_pod(cluster)["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/bash", "-c"]
    script: str = command[2]
    return script


def test_ray_head_waits_for_the_bridge_before_stopping(cluster: dict[str, Any]) -> None:
    script = head_pre_stop(cluster)
    port = flag(bridge_argv(cluster), "--health-port")
    assert f"/dev/tcp/127.0.0.1/{port}" in script and script.endswith("ray stop")
    wait_s = int(re.search(r"seq (\d+)", script).group(1))  # type: ignore[union-attr]
    drain_s = float(flag(bridge_argv(cluster), "--drain-timeout"))
    assert drain_s < wait_s < head_pod(cluster)["terminationGracePeriodSeconds"]


def run_pre_stop(cluster: dict[str, Any], port: int) -> subprocess.CompletedProcess[str]:
    health_port = flag(bridge_argv(cluster), "--health-port")
    script = head_pre_stop(cluster).replace(f"/{health_port}", f"/{port}")
    script = script.replace("ray stop", "echo ray stopped")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)


def test_ray_head_pre_stop_returns_once_the_bridge_is_gone(cluster: dict[str, Any]) -> None:
    # While the port is open the script waits; when it closes, Ray is stopped.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = threading.Event()

    def accept_once_then_close() -> None:
        conn, _ = server.accept()
        conn.close()
        server.close()
        accepted.set()

    thread = threading.Thread(target=accept_once_then_close, daemon=True)
    thread.start()
    result = run_pre_stop(cluster, port)
    assert accepted.is_set(), "the script never looked at the bridge's port"
    assert result.stdout.strip() == "ray stopped"
    thread.join(timeout=5)
    # Nothing listening (bridge already gone): Ray is stopped at once.
    assert run_pre_stop(cluster, port).stdout.strip() == "ray stopped"


def test_containers_use_known_fields_and_one_image(cluster: dict[str, Any]) -> None:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    for c in containers:
        assert set(c) <= CONTAINER_FIELDS, set(c) - CONTAINER_FIELDS
        assert "resources" in c, c["name"]
    # Ray requires the same Ray and Python versions on every node and driver;
    # the node caches are ALPCRUN.CH's own image.
    ray = [c for c in containers if c["name"] != NODE_CACHE]
    assert len({c["image"] for c in ray}) == 1
    caches = [c for c in containers if c["name"] == NODE_CACHE]
    assert len({c["image"] for c in caches}) == 1
    assert not {c["image"] for c in ray} & {c["image"] for c in caches}


def pods(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every pod template: ``head`` and each worker group by name."""
    out = {"head": head_pod(cluster)}
    for group in cluster["spec"]["workerGroupSpecs"]:
        out[group["groupName"]] = group["template"]["spec"]
    return out


def test_the_command_runs_a_bridge_per_node_on_each_nodes_cache(cluster: dict[str, Any]) -> None:
    argv = bridge_argv(cluster)
    assert flag(argv, "--bridges") == "per-node", "stated, not left to the default"
    args = parse_bridge_args(argv)
    assert args.bridges == "per-node"
    # Each bridge resolves localhost on its own pod: the node-cache sidecar there.
    assert args.cache == f"localhost:{NODE_CACHE_PORT}"
    maps = [d["data"] for d in documents() if d["kind"] == "ConfigMap"]
    assert all("METALCORE_CACHE_ADDR" not in data for data in maps), "one place says it"


def test_worker_groups_name_their_node_bridges_from_the_downward_api(
    cluster: dict[str, Any],
) -> None:
    # A node bridge is a Ray worker process of the pod's Ray container and
    # inherits the raylet's environment, so the names are set there.
    groups = cluster["spec"]["workerGroupSpecs"]
    assert any(g["groupName"] == "gpu" for g in groups)
    for group in groups:
        ray = group["template"]["spec"]["containers"][0]
        env = env_of(ray)
        for name, path in (("METALCORE_WORKER_NODE", "spec.nodeName"),
                           ("METALCORE_WORKER_POD", "metadata.name")):  # fmt: skip
            assert name in env, (group["groupName"], name)
            assert "value" not in env[name], (group["groupName"], name)
            assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == path, group["groupName"]


def test_every_pod_that_runs_a_bridge_has_its_node_cache(cluster: dict[str, Any]) -> None:
    for pod_name, pod in pods(cluster).items():
        [cache] = [c for c in pod["containers"] if c["name"] == NODE_CACHE]
        assert pod["containers"].index(cache) > 0, "KubeRay runs `ray start` in container 0"
        assert NODE_CACHE_PORT in {p["containerPort"] for p in cache["ports"]}, pod_name
        others = {
            p["containerPort"]
            for c in pod["containers"]
            if c is not cache
            for p in c.get("ports", [])
        }
        assert NODE_CACHE_PORT not in others, pod_name
        # The node cache checks the same key as every other ALPCRUN.CH service.
        key = env_of(cache)["METALCORE_API_KEY"]
        assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"], pod_name


def test_the_ca_bundle_is_mounted_where_bridges_read_it(cluster: dict[str, Any]) -> None:
    # The CLI passes --ca-cert as a path: the coordinator (a Ray worker process
    # of ray-head) and each node bridge (of its pod's ray-worker) read it
    # there, so every Ray container mounts the Secret, not the sidecar alone.
    match = re.search(r"--ca-cert (/[^\s\"']+)", bridge_script(cluster))
    assert match, "the script passes --ca-cert when the CA Secret is mounted"
    ca_path = Path(match.group(1))
    for pod_name, pod in pods(cluster).items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        ray_containers = [pod["containers"][0]]
        if pod_name == "head":
            ray_containers.append(bridge_container(cluster))
        for c in ray_containers:
            mounts = [
                m for m in c.get("volumeMounts", []) if ca_path.is_relative_to(m["mountPath"])
            ]
            assert mounts, (pod_name, c["name"], "no mount holds", str(ca_path))
            secret = volumes[mounts[0]["name"]]["secret"]
            assert secret["secretName"] == "alpcrun-ca" and secret["optional"] is True


def test_ray_version_matches_cluster_yaml(cluster: dict[str, Any]) -> None:
    # Both deployments pin one Ray version; bump them together.
    cluster_yaml = (MANIFEST.parents[2] / "cluster.yaml").read_text()
    pins = set(re.findall(r"ray\[default\]==([0-9.]+)", cluster_yaml))
    assert pins == {cluster["spec"]["rayVersion"]}


@pytest.mark.parametrize("planted", PLANTED_SECRETS)
def test_secret_detector_catches_planted_secrets(planted: str) -> None:
    assert secret_findings(planted)


def test_no_secret_in_the_manifest() -> None:
    assert secret_findings(MANIFEST.read_text()) == []
