"""A Ray cluster with the real autoscaler and Ray's fake multi-node provider, that
stops only its own processes.

``ray.cluster_utils.AutoscalingCluster`` runs ``ray stop --force`` when it
starts and stops: that kills every Ray on the machine (other test sessions'
included). This launcher starts the head with ``ray start --head`` under its
own temp dir and free ports, with the autoscaling config built here (the wheel
lacks the fake provider's example.yaml), and on :meth:`stop` ends exactly the
processes that belong to it: those whose command line names its temp dir or
its GCS port (the fake worker nodes' raylets included). Used by
``tests/support/multinode_scenarios.py`` and ``benchmarks/elastic.py``, always in a
process of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def autoscaling_config(
    worker_types: dict[str, Any], gcs_address: str, idle_timeout_minutes: float = 0.05
) -> dict[str, Any]:
    """The fake provider's config (what Ray's missing example.yaml holds)."""
    types = dict(worker_types)
    types["ray.head.default"] = {"resources": {}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "fake_multinode",
        "max_workers": sum(int(t.get("max_workers", 0)) for t in worker_types.values()),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "upscaling_speed": 100.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "auth": {"ssh_user": "ubuntu"},
    }


class FakeAutoscalingCluster:
    """``start()``, then ``ray.init(address=cluster.address)``; ``stop()`` at the end."""

    def __init__(
        self,
        worker_types: dict[str, Any],
        head_cpus: float = 0,
        idle_timeout_minutes: float = 0.05,
        v2: bool = False,
    ) -> None:
        self.v2 = v2  # Ray's autoscaler v2: it publishes the node types in the GCS
        self.worker_types = worker_types
        self.head_cpus = head_cpus
        self.idle_timeout_minutes = idle_timeout_minutes
        self.port = free_port()
        # Short: Ray's socket paths live under it and must stay below 108 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rfa", dir="/tmp")
        self.address = ""

    def start(self) -> str:
        from ray._private.services import get_node_ip_address

        self.address = f"{get_node_ip_address()}:{self.port}"
        config = autoscaling_config(self.worker_types, self.address, self.idle_timeout_minutes)
        if self.v2:
            from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

            config["provider"].update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
        config_path = os.path.join(self.temp_dir, "autoscaling.json")
        Path(config_path).write_text(json.dumps(config))
        env = dict(os.environ)
        # Token auth off: the drivers of these tests hold no token.
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled")
        if self.v2:
            env.update(
                RAY_enable_autoscaler_v2="1",
                RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
                RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID,
            )
        cmd = self.head_command(f"--autoscaling-config={config_path}")
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
        return self.address

    def head_command(self, *extra: str) -> list[str]:
        """``ray start --head`` on this cluster's port and temp dir, every other
        port free, small and quiet (``extra`` flags added)."""
        return [
            RAY, "start", "--head",
            f"--port={self.port}",
            f"--temp-dir={self.temp_dir}",
            *extra,
            f"--num-cpus={self.head_cpus:g}",
            "--num-gpus=0",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
        ]  # fmt: skip

    def own_pids(self) -> list[int]:
        """Processes of this cluster: they name its temp dir or its GCS port (Linux /proc)."""
        marks = (self.temp_dir, f":{self.port}", f"--gcs_server_port={self.port}")
        me = os.getpid()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                raw = (entry / "cmdline").read_bytes()
                line = raw.replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if any(m in line for m in marks):
                pids.append(int(entry.name))
        return pids

    def stop(self, timeout_s: float = 20.0) -> list[int]:
        """End this cluster's processes (and no other); returns any that survived."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.own_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + timeout_s / 2
            while self.own_pids() and time.monotonic() < deadline:
                time.sleep(0.2)  # ok: bounded wait for killed processes to exit
        left = self.own_pids()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left
