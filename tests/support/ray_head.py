"""A Ray head started by hand, as a user does (``ray start --head --port P``), in
its own temp dir and with its own HOME, and stopped by killing its own
processes (never ``ray stop``, which would end every Ray on the machine)."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

from tests.support.fake_autoscaler import FakeAutoscalingCluster

# What decides Ray's token authentication; unset for a run "as a new user".
RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def write_token(home: Path) -> str:
    """``home/.ray/auth_token``, as the first ``ray.init()`` on a machine writes it."""
    token = secrets.token_hex(32)
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    (home / ".ray" / "auth_token").write_text(token)
    return token


class HandStartedHead(FakeAutoscalingCluster):
    """``ray start --head --num-cpus N --port P`` with ``HOME=home`` and no
    ``RAY_AUTH_*`` set: where ``home/.ray/auth_token`` exists, Ray turns token
    authentication on for the cluster by itself. ``stop()`` ends its processes."""

    def __init__(self, home: Path, cpus: float = 1) -> None:
        super().__init__({}, head_cpus=cpus)
        self.home = home

    def start(self) -> str:
        env = {k: v for k, v in os.environ.items() if k not in RAY_AUTH_VARS}
        env["HOME"] = str(self.home)
        subprocess.run(self.head_command(), env=env, check=True, capture_output=True, timeout=120)
        self.address = f"127.0.0.1:{self.port}"
        return self.address
