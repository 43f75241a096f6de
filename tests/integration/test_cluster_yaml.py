"""``cluster.yaml`` passes Ray's own offline validation and deploys the bridge as intended.

Ray's validator is the first half of what ``ray up`` does (``_bootstrap_config``):
``prepare_config`` merges the provider's ``defaults.yaml`` and fills min/max
workers, ``validate_config`` checks the JSON schema and the cross-field rules.
The second half -- ``fillout_available_node_types_resources`` (asks AWS for the
instance types) and ``bootstrap_config`` (IAM roles, subnets, key pairs) --
needs cloud credentials and is deliberately not run; a socket guard proves the
part that is run stays offline.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import socket
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
UNIT_NAME = "ray-alpcrun-bridge.service"
# ALPCRUN.CH's node cache, on every node (the upstream guide's localhost:3337).
NODE_CACHE_PORT = 3337


def raw_config() -> dict[str, Any]:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert isinstance(config, dict)
    return config


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network (AWS, PyPI, DNS) fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access during offline validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def prepared(offline: None) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw_config()))
    validate_config(config)
    return config


def test_ray_validator_accepts_it(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_validator_can_fail(offline: None) -> None:
    # The check above means something: the same validator rejects a broken copy.
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(raw_config())
    broken["available_node_types"]["gpu_worker"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def gpu_node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {
        name: spec
        for name, spec in config["available_node_types"].items()
        if name != head and spec.get("resources", {}).get("GPU", 0) >= 1
    }


def test_gpu_workers_autoscale(prepared: dict[str, Any]) -> None:
    gpu = gpu_node_types(prepared)
    assert gpu, "no worker node type offers a GPU"
    for name, spec in gpu.items():
        # Starts with no GPU node: the elastic pool's pending actors make it grow.
        assert spec["min_workers"] == 0 < spec["max_workers"], name
        assert spec["max_workers"] <= prepared["max_workers"], name
        assert spec["node_config"]["InstanceType"].startswith(("g", "p")), name
    head = prepared["available_node_types"][prepared["head_node_type"]]
    # Keep compute off the head: pool actors need CPU or GPU, the head offers neither.
    assert head["resources"].get("CPU") == 0
    assert head["max_workers"] == 0


def test_setup_installs_the_gpu_extra(prepared: dict[str, Any]) -> None:
    # After prepare_config the common setup commands are merged into both lists.
    for key in ("head_setup_commands", "worker_setup_commands"):
        joined = "\n".join(prepared[key])
        assert re.search(r"pip install \S*ray_alpcrun\S*\[gpu\]", joined) or re.search(
            r'pip install "\$\{WHL\}\[gpu\]"', joined
        ), key
    # The wheel the install line uses is synced by file_mounts.
    assert "./dist" in prepared["file_mounts"].values()


def start_command_with_bridge(config: dict[str, Any]) -> str:
    hits = [c for c in config["head_start_ray_commands"] if "-m ray_alpcrun.bridge" in c]
    assert len(hits) == 1, "exactly one head start command launches the bridge"
    return hits[0]


def test_head_starts_the_bridge_after_ray(prepared: dict[str, Any]) -> None:
    commands = prepared["head_start_ray_commands"]
    cmd = start_command_with_bridge(prepared)
    ray_start = next(i for i, c in enumerate(commands) if "ray start --head" in c)
    assert commands.index(cmd) > ray_start, "the bridge joins Ray, so Ray starts first"
    stop = next(i for i, c in enumerate(commands) if "systemctl stop ray-alpcrun-bridge" in c)
    assert stop < commands.index("ray stop"), "drain the bridge before Ray goes away"
    assert re.search(r"python -m ray_alpcrun\.bridge [^\n]*--ray-address auto", cmd)


def render_unit(tmp_path: Path, with_ca: bool) -> str:
    """Run the head start command in bash with sudo/systemctl stubbed; return the unit."""
    cmd = start_command_with_bridge(raw_config())
    home = tmp_path / "home"
    (home / "alpcrun").mkdir(parents=True)
    if with_ca:
        (home / "alpcrun" / "ca.crt").write_text("test CA\n")
    unit = tmp_path / UNIT_NAME
    stubs = (
        f'sudo() {{ if [ "$1" = tee ]; then cat > "{unit}"; else "$@"; fi; }}\n'
        "systemctl() { :; }\n"
    )
    subprocess.run(
        ["bash", "-euc", stubs + cmd],
        # As in ray's login shell: the environment's python comes first on PATH.
        env={"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
        check=True,
        timeout=10,
    )
    return unit.read_text()


def unit_entries(text: str) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key, []).append(value)
    return entries


def test_bridge_unit_restarts_and_reads_settings_from_a_file(tmp_path: Path) -> None:
    text = render_unit(tmp_path, with_ca=False)
    entries = unit_entries(text)
    assert entries["Restart"] == ["always"]
    assert entries["StartLimitIntervalSec"] == ["0"], "never stop restarting"
    assert entries["EnvironmentFile"] == [str(tmp_path / "home" / "alpcrun" / "bridge.env")]
    [exec_start] = entries["ExecStart"]
    assert exec_start.startswith("/usr/bin/env python -m ray_alpcrun.bridge --ray-address auto ")
    assert "--api-key" not in exec_start, "keys on command lines are visible to every user"
    assert "--ca-cert" not in exec_start
    port = int(re.search(r"--health-port (\d+)", exec_start).group(1))  # type: ignore[union-attr]
    assert port != RAY_METRICS_PORT
    drain_s = float(re.search(r"--drain-timeout (\d+)", exec_start).group(1))  # type: ignore[union-attr]
    assert float(entries["TimeoutStopSec"][0]) > drain_s, "systemd must not kill a drain"
    # PATH points at the python that `ray start` used (its directory comes first).
    assert entries["Environment"][0].startswith("PATH=/")


def test_bridge_cli_accepts_the_unit_flags(tmp_path: Path) -> None:
    # Catches drift between this file and the CLI: parse with the bridge's own parser.
    exec_start = unit_entries(render_unit(tmp_path, with_ca=True))["ExecStart"][0]
    argv = shlex.split(exec_start.split(" -m ray_alpcrun.bridge ", 1)[1])
    args = parse_bridge_args(argv)
    assert args.ray_address == "auto"
    assert args.gpus_per_actor >= 1 and args.actors is None
    # The elastic pool, as the bridge itself reads the flags.
    from ray_alpcrun.bridge.cli import config_from_args
    from ray_alpcrun.config import Env

    pool = config_from_args(args, Env(api_key="k")).pool
    assert pool is not None and pool.elastic and pool.lowest == 0 and pool.highest >= 1


def test_gpu_nodes_can_hold_the_whole_pool(tmp_path: Path, prepared: dict[str, Any]) -> None:
    # Otherwise some actors wait forever for a GPU node the autoscaler may not add.
    exec_start = unit_entries(render_unit(tmp_path, with_ca=False))["ExecStart"][0]
    args = parse_bridge_args(shlex.split(exec_start.split(" -m ray_alpcrun.bridge ", 1)[1]))
    capacity = sum(
        spec["max_workers"] * spec["resources"]["GPU"] for spec in gpu_node_types(prepared).values()
    )
    per_node = max(spec["resources"]["GPU"] for spec in gpu_node_types(prepared).values())
    assert args.gpus_per_actor <= per_node
    assert args.max_actors * args.gpus_per_actor <= capacity


def test_the_unit_runs_a_bridge_per_node_on_each_nodes_cache(tmp_path: Path) -> None:
    exec_start = unit_entries(render_unit(tmp_path, with_ca=False))["ExecStart"][0]
    assert " --bridges per-node " in exec_start, "stated, not left to the default"
    args = parse_bridge_args(shlex.split(exec_start.split(" -m ray_alpcrun.bridge ", 1)[1]))
    assert args.bridges == "per-node"
    # Each bridge resolves localhost on its own node: the node cache there.
    assert args.cache == f"localhost:{NODE_CACHE_PORT}"


def test_worker_nodes_export_their_node_name_before_ray_start(tmp_path: Path) -> None:
    # Each command runs in a shell of its own: the name must be exported in the
    # command that runs `ray start`, so that the raylet -- and the node bridge,
    # a Ray worker process of that node -- inherit it.
    seen = tmp_path / "seen"
    stubs = (
        "hostname() { echo ip-10-0-1-23; }\n"
        "ulimit() { :; }\n"
        'ray() { if [ "$1" = start ]; then'
        f' printenv METALCORE_WORKER_NODE >> "{seen}" || echo not-exported >> "{seen}"; fi; }}\n'
    )
    commands = raw_config()["worker_start_ray_commands"]
    assert any("ray start" in c for c in commands)
    for cmd in commands:
        subprocess.run(
            ["bash", "-c", stubs + cmd],
            env={"RAY_HEAD_IP": "10.0.0.1", "PATH": "/usr/bin:/bin"},
            check=True,
            timeout=10,
        )
    assert seen.read_text().split() == ["ip-10-0-1-23"]


def test_every_node_runs_its_node_cache_on_localhost(
    tmp_path: Path, prepared: dict[str, Any]
) -> None:
    # The node cache's commands, as ray up runs them on the head and on a
    # worker (setup_commands merged into both), with sudo and docker stubbed.
    for key in ("head_setup_commands", "worker_setup_commands"):
        home = tmp_path / key
        (home / "alpcrun").mkdir(parents=True)
        (home / "alpcrun" / "node-cache.env").write_text("")
        calls = home / "docker-calls"
        stubs = f'sudo() {{ "$@"; }}\ndocker() {{ echo "$*" >> "{calls}"; }}\n'
        for cmd in prepared[key]:
            if "node-cache" in cmd:
                subprocess.run(
                    ["bash", "-euc", stubs + cmd],
                    env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                    check=True,
                    timeout=10,
                )
        [run] = [c for c in calls.read_text().splitlines() if c.startswith("run ")]
        # Reachable as localhost:3337 on its own node only (plaintext), back
        # after a crash or reboot, its key from the synced file.
        assert f"-p 127.0.0.1:{NODE_CACHE_PORT}:{NODE_CACHE_PORT}" in run, key
        assert "--restart always" in run, key
        assert f"--env-file {home}/alpcrun/node-cache.env" in run, key
        # The workers' setup keeps the node cache's settings (it needs the key).
        removed = [c for c in prepared[key] if c.startswith("rm ")]
        assert all("node-cache.env" not in c for c in removed), key


def test_bridge_unit_uses_tls_when_a_ca_is_synced(tmp_path: Path) -> None:
    exec_start = unit_entries(render_unit(tmp_path, with_ca=True))["ExecStart"][0]
    assert exec_start.endswith(f"--ca-cert {tmp_path}/home/alpcrun/ca.crt")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_bridge_unit_is_valid_for_systemd(tmp_path: Path) -> None:
    unit = tmp_path / UNIT_NAME
    unit.write_text(render_unit(tmp_path, with_ca=False))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=15,
    )
    problems = [line for line in result.stderr.splitlines() if UNIT_NAME in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_every_shell_command_parses() -> None:
    config = raw_config()
    keys = [k for k in config if k.endswith("_commands")]
    assert "head_start_ray_commands" in keys
    for key in keys:
        for cmd in config[key]:
            subprocess.run(["bash", "-n", "-c", cmd], check=True, timeout=10)


@pytest.mark.parametrize("planted", PLANTED_SECRETS)
def test_secret_detector_catches_planted_secrets(planted: str) -> None:
    assert secret_findings(planted)


def test_no_secret_in_cluster_yaml() -> None:
    assert secret_findings(CLUSTER_YAML.read_text()) == []
    # The key reaches the head only through a file outside the repository.
    mounts = raw_config()["file_mounts"]
    local = [Path(p).expanduser() for p in mounts.values()]
    assert any(not p.is_relative_to(ROOT) and str(p).startswith(str(Path.home())) for p in local)
