"""ray_alpcrun: a Ray cluster as the compute back end of ALPCRUN.CH.

The public API is importable from here::

    from ray_alpcrun import Client, Handler, LocalServices, RayPool

Importing the package is cheap: every name below is loaded on first use (a
module-level ``__getattr__``), so ``import ray_alpcrun`` imports neither Ray,
gRPC nor NumPy; Ray, CuPy and NVML are imported only where they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    # Writing a handler (runs inside the pool's Ray actors).
    "Handler": "ray_alpcrun.handler",
    "SessionContext": "ray_alpcrun.handler",
    # Submitting work to ALPCRUN.CH.
    "AsyncClient": "ray_alpcrun.client",
    "AsyncSession": "ray_alpcrun.client",
    "Client": "ray_alpcrun.client",
    "Session": "ray_alpcrun.client",
    "TaskResult": "ray_alpcrun.client",
    # Running a handler on Ray directly (notebooks, no queue manager).
    "RayPool": "ray_alpcrun.pool.notebook",
    # The local queue manager and caches (tests, examples, notebooks).
    "LocalServices": "ray_alpcrun.devserver",
    # Embedding the bridge in a Python program.
    "start_bridge": "ray_alpcrun.bridge.launch",
    # Configuration.
    "BridgeConfig": "ray_alpcrun.config",
    "DevServerConfig": "ray_alpcrun.config",
    "PoolConfig": "ray_alpcrun.config",
    "ServiceConfig": "ray_alpcrun.config",
    # Errors a caller may catch (all derive from AlpcrunError).
    "AlpcrunError": "ray_alpcrun.errors",
    "ConfigError": "ray_alpcrun.errors",
    "HandlerError": "ray_alpcrun.errors",
    "RpcError": "ray_alpcrun.errors",
    "SubmitTimeout": "ray_alpcrun.errors",
    "TaskFailed": "ray_alpcrun.errors",
    "TasksFailed": "ray_alpcrun.errors",
}

__all__ = [  # noqa: RUF022 - grouped by what a user does, not sorted
    "__version__",
    # handler API
    "Handler",
    "SessionContext",
    # client
    "AsyncClient",
    "AsyncSession",
    "Client",
    "Session",
    "TaskResult",
    # Ray without a queue manager
    "RayPool",
    # local services, embedding the bridge
    "LocalServices",
    "start_bridge",
    # configuration
    "BridgeConfig",
    "DevServerConfig",
    "PoolConfig",
    "ServiceConfig",
    # errors
    "AlpcrunError",
    "ConfigError",
    "HandlerError",
    "RpcError",
    "SubmitTimeout",
    "TaskFailed",
    "TasksFailed",
]

if TYPE_CHECKING:
    from ray_alpcrun.bridge.launch import start_bridge
    from ray_alpcrun.client import AsyncClient, AsyncSession, Client, Session, TaskResult
    from ray_alpcrun.config import BridgeConfig, DevServerConfig, PoolConfig, ServiceConfig
    from ray_alpcrun.devserver import LocalServices
    from ray_alpcrun.errors import (
        AlpcrunError,
        ConfigError,
        HandlerError,
        RpcError,
        SubmitTimeout,
        TaskFailed,
        TasksFailed,
    )
    from ray_alpcrun.handler import Handler, SessionContext
    from ray_alpcrun.pool.notebook import RayPool


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ray_alpcrun' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
