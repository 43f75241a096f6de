"""The public API is importable from ``ray_alpcrun`` itself, and lazily: importing
the package loads neither Ray, gRPC nor NumPy."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ray_alpcrun


def test_every_public_name_resolves_and_is_listed() -> None:
    names = set(ray_alpcrun.__all__) - {"__version__"}
    assert {"Handler", "SessionContext", "Client", "AsyncClient", "RayPool"} <= names
    assert "LocalServices" in names
    for name in sorted(names):
        value = getattr(ray_alpcrun, name)
        assert value.__name__ == name
        assert name in dir(ray_alpcrun)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        ray_alpcrun.no_such_name  # noqa: B018


def test_importing_the_package_imports_no_heavy_dependency() -> None:
    # A fresh interpreter: this test process has Ray and gRPC loaded already.
    code = (
        "import sys, ray_alpcrun\n"
        "heavy = ('ray', 'grpc', 'numpy', 'google.protobuf', 'cupy', 'pynvml')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "print(sorted(m for m in sys.modules if m.startswith('ray_alpcrun.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    heavy, submodules = out.stdout.splitlines()
    assert heavy == "[]"
    assert submodules == "[]"  # the facade imports nothing until a name is used
