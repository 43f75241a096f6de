"""Checks shared by the deployment-file tests (cluster.yaml, KubeRay manifest)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

import pytest

# Ray's Prometheus endpoint in both deployments (KubeRay's default port); the
# bridge's health server must not take it.
RAY_METRICS_PORT = 8080

# Patterns that would mean a secret was written into a deployment file.
SECRET_PATTERNS = [
    # METALCORE_API_KEY given a value: KEY=value or KEY: value (references
    # such as $VAR, ${VAR} or <placeholder> are fine).
    re.compile(r"METALCORE_API_KEY\s*[=:]\s*[\"']?[^\s\"'$<{}]"),
    # A Kubernetes env entry with a literal value instead of valueFrom.
    re.compile(r"name:\s*METALCORE_API_KEY\s*\n\s*value:"),
    # Command lines are visible to every user of the machine.
    re.compile(r"--api-key[ =]"),
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"aws_secret_access_key", re.IGNORECASE),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]

PLANTED_SECRETS = [
    "  - export METALCORE_API_KEY=s3cr3t\n",
    "env:\n  METALCORE_API_KEY: s3cr3t\n",
    "- name: METALCORE_API_KEY\n  value: s3cr3t\n",
    "ExecStart=python -m ray_alpcrun.bridge --api-key s3cr3t\n",
    "aws_access_key_id = AKIAABCDEFGHIJKLMNOP\n",
    "-----BEGIN RSA PRIVATE KEY-----\n",
]


def secret_findings(text: str) -> list[str]:
    """The patterns from :data:`SECRET_PATTERNS` that ``text`` matches."""
    return [p.pattern for p in SECRET_PATTERNS if p.search(text)]


def parse_bridge_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse bridge flags with the bridge's own parser (catches flag drift).

    Skips when the bridge CLI is not importable; a flag it does not know makes
    argparse exit, which fails the calling test.
    """
    cli = pytest.importorskip("ray_alpcrun.bridge.cli")
    from ray_alpcrun.config import Env

    return cli.build_parser(Env()).parse_args(list(argv))  # type: ignore[no-any-return]
