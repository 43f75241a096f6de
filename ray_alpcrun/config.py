"""Settings, in one place: frozen dataclasses built from ``METALCORE_*``
environment variables and command-line flags. Nothing else reads ``os.environ``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ray_alpcrun.errors import ConfigError
from ray_alpcrun.transport import DEFAULT_MAX_MESSAGE_BYTES, TlsFiles
from ray_alpcrun.wire import DEFAULT_PROTO_PACKAGE

ENV_API_KEY = "METALCORE_API_KEY"
ENV_WORKER_NODE = "METALCORE_WORKER_NODE"
ENV_WORKER_POD = "METALCORE_WORKER_POD"
ENV_QUEUE_ADDR = "METALCORE_QUEUE_MANAGER_ADDR"
ENV_CACHE_ADDR = "METALCORE_CACHE_ADDR"
ENV_CENTRAL_CACHE_ADDR = "METALCORE_CENTRAL_CACHE_ADDR"
ENV_LOG_LEVEL = "METALCORE_LOG_LEVEL"
ENV_NUM_THREADS = "METALCORE_NUM_THREADS"
ENV_CA_CERT = "METALCORE_CA_CERT"
ENV_CACHE_CA_CERT = "METALCORE_CACHE_CA_CERT"
# Ray's token authentication, read where the bridge joins a cluster (RayAuth).
ENV_RAY_AUTH_MODE = "RAY_AUTH_MODE"
ENV_RAY_AUTH_TOKEN = "RAY_AUTH_TOKEN"
ENV_RAY_AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"

DEFAULT_QUEUE_ADDR = "127.0.0.1:1337"
DEFAULT_CENTRAL_CACHE_ADDR = "127.0.0.1:2337"
DEFAULT_NODE_CACHE_ADDR = "127.0.0.1:3337"


@dataclass(frozen=True, slots=True)
class Env:
    """A snapshot of the ``METALCORE_*`` variables; ``None`` where unset or empty."""

    api_key: str | None = field(default=None, repr=False)  # never in reprs, logs, tracebacks
    worker_node: str | None = None
    worker_pod: str | None = None
    queue_addr: str | None = None
    cache_addr: str | None = None
    central_cache_addr: str | None = None
    log_level: str | None = None
    num_threads: int | None = None
    ca_cert: str | None = None
    cache_ca_cert: str | None = None

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Env:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        threads = get(ENV_NUM_THREADS)
        try:
            num_threads = int(threads) if threads is not None else None
        except ValueError as exc:
            raise ConfigError(f"{ENV_NUM_THREADS} must be an integer, got {threads!r}") from exc
        return cls(
            api_key=get(ENV_API_KEY),
            worker_node=get(ENV_WORKER_NODE),
            worker_pod=get(ENV_WORKER_POD),
            queue_addr=get(ENV_QUEUE_ADDR),
            cache_addr=get(ENV_CACHE_ADDR),
            central_cache_addr=get(ENV_CENTRAL_CACHE_ADDR),
            log_level=get(ENV_LOG_LEVEL),
            num_threads=num_threads,
            ca_cert=get(ENV_CA_CERT),
            cache_ca_cert=get(ENV_CACHE_CA_CERT),
        )


@dataclass(frozen=True, slots=True)
class RayAuth:
    """Ray's token authentication as this process would join a cluster with it.

    A head started by ``ray start --head`` where a token exists (``~/.ray/auth_token``
    is written by the first ``ray.init()`` on a machine) asks every process that
    joins for it. Ray turns token mode on by itself only for ``ray.init()`` and
    ``address="auto"``; joining by ``HOST:PORT`` it stays off unless
    ``RAY_AUTH_MODE=token`` is set, even with the token at hand, and the join
    fails after ~20 s. :meth:`join_env` says what to set instead.

    ``mode`` is ``RAY_AUTH_MODE`` as set (``None``: unset); ``token_source`` is
    where Ray would read the token (``RAY_AUTH_TOKEN``, or a file), ``None``
    when there is none.
    """

    mode: str | None = None
    token_source: str | None = None

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None, home: Path | None = None) -> RayAuth:
        """From the environment and the files Ray reads the token from, in Ray's
        order: ``RAY_AUTH_TOKEN``, then ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``."""
        env = os.environ if environ is None else environ
        mode = env.get(ENV_RAY_AUTH_MODE, "").strip().lower() or None
        source = None
        path = env.get(ENV_RAY_AUTH_TOKEN_PATH, "").strip()
        if env.get(ENV_RAY_AUTH_TOKEN, "").strip():
            source = ENV_RAY_AUTH_TOKEN
        elif path:
            source = path if _non_empty(Path(path).expanduser()) else None
        else:
            default = (Path.home() if home is None else home) / ".ray" / "auth_token"
            source = str(default) if _non_empty(default) else None
        return cls(mode=mode, token_source=source)

    def join_env(self, address: str) -> dict[str, str]:
        """What to add to the environment to join ``address``, whose Ray cluster
        refused this process for want of a token: ``RAY_AUTH_MODE=token`` when
        the mode is unset and a token is at hand. Raises ConfigError naming the
        fix when there is nothing to add (no token, or a mode set otherwise)."""
        cluster = f"the Ray cluster at {address} uses token authentication"
        if self.mode not in (None, "token"):
            raise ConfigError(f"{cluster}, but {ENV_RAY_AUTH_MODE}={self.mode} here: unset it")
        if self.token_source is None:
            raise ConfigError(
                f"{cluster} and no token is found here: copy the head's token (`ray get-auth-token`"
                f" on the head prints it) to ~/.ray/auth_token, or set {ENV_RAY_AUTH_TOKEN}"
            )
        if self.mode == "token":
            raise self.refused(address)
        return {ENV_RAY_AUTH_MODE: "token"}

    def refused(self, address: str) -> ConfigError:
        """The error for a cluster that refused the token this process has."""
        return ConfigError(
            f"the Ray cluster at {address} refused the token from {self.token_source}: "
            "use the head's (`ray get-auth-token` on the head prints it)"
        )


def _non_empty(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def default_node() -> str:
    """Outside Kubernetes the node is this host."""
    return socket.gethostname()


def default_pod() -> str:
    """Outside Kubernetes a pod name that is unique per process on this host."""
    return f"{socket.gethostname()}-{os.getpid()}"


def check_address(address: str, what: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{what} must be HOST:PORT, got {address!r}")
    return address


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """How to reach the ALPCRUN.CH services (queue manager and caches).

    TLS is set per service, as the upstream guide deploys them: ``tls`` for the
    queue manager (and the central cache a client publishes to), ``cache_tls``
    for the node cache a worker reads shared data from; ``None`` is plaintext
    (the guide reaches its node cache on ``localhost:3337`` without TLS).
    """

    queue_address: str = DEFAULT_QUEUE_ADDR
    cache_address: str = DEFAULT_NODE_CACHE_ADDR
    central_cache_address: str = DEFAULT_CENTRAL_CACHE_ADDR
    api_key: str | None = field(default=None, repr=False)  # never in reprs, logs, tracebacks
    proto_package: str = DEFAULT_PROTO_PACKAGE
    tls: TlsFiles | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    cache_tls: TlsFiles | None = None

    def __post_init__(self) -> None:
        check_address(self.queue_address, "queue address")
        check_address(self.cache_address, "cache address")
        check_address(self.central_cache_address, "central cache address")
        if self.max_message_bytes <= 0:
            raise ConfigError("max_message_bytes must be positive")


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    node: str = field(default_factory=default_node)
    pod: str = field(default_factory=default_pod)

    def __post_init__(self) -> None:
        if not self.node or not self.pod:
            raise ConfigError("worker node and pod must not be empty")


DATA_PATHS = ("calls", "direct")
BRIDGE_MODES = ("per-node", "one")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """How the Ray actor pool is shaped (see :class:`ray_alpcrun.pool.ActorPool`).

    A batch is split into sub-batches, one Ray call each, of at least
    ``min_chunk`` tasks and, once the handler's cost per task has been measured,
    at least ``min_chunk_work_s`` of work: for cheap tasks a Ray call costs more
    than the tasks, so small batches stay whole. ``actor_options`` are extra
    ``ray.remote`` options for the pool actors (e.g. ``runtime_env``).

    Elastic sizing (see :mod:`ray_alpcrun.pool.scaling`): with ``min_actors`` and
    ``max_actors`` set, the pool keeps between them, asking for another actor
    while the batches in flight per actor stay above
    ``target_batches_per_actor`` and releasing idle actors once fewer would do
    for ``downscale_delay_s``. Unset, the pool is fixed at ``num_actors``.
    """

    num_actors: int = 2
    min_actors: int | None = None
    max_actors: int | None = None
    target_batches_per_actor: float = 1.0
    downscale_delay_s: float = 30.0
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    max_sessions_per_actor: int = 32
    task_timeout_s: float | None = None
    max_call_retries: int = 2
    # A lost actor is replaced for as long as the pool runs; start attempts back
    # off exponentially (from 0.5 s) up to this pause between them.
    restart_backoff_max_s: float = 30.0
    # With no live actor for this long, the pool gives up for now: the bridge
    # stops taking work until an actor is live again (an elastic pool waiting
    # for room is exempt; its bound counts while its starts fail).
    no_actor_grace_s: float = 60.0
    min_chunk: int = 16
    min_chunk_work_s: float = 0.005
    gpu_memory_limit_bytes: int | None = None
    # Cap on each actor's private memory (RLIMIT_DATA): a leaking handler then
    # gets MemoryError (its task fails) instead of growing until the node is full.
    memory_limit_bytes: int | None = None
    # How sub-batches reach the actors: "direct" (a Unix socket per same-node actor,
    # ray_alpcrun.pool.direct; the default, see docs/performance.md), "calls"
    # or "calls" (ordinary Ray actor calls). "direct" falls back to ordinary calls
    # for actors on other nodes. (Ray Compiled Graphs were retired: docs/performance.md says why.)
    data_path: str = "direct"
    actor_options: Mapping[str, object] = field(default_factory=dict)
    # How the actors log (see ray_alpcrun.logs.setup_logging); None: Ray's default.
    log_level: str | None = None
    log_json: bool = False

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ConfigError("the pool needs at least one actor")
        if self.min_actors is not None and self.min_actors < 0:
            raise ConfigError("min_actors must not be negative")
        if self.max_actors is not None and self.max_actors < max(1, self.lowest):
            raise ConfigError("max_actors must be at least 1 and at least min_actors")
        if self.target_batches_per_actor <= 0:
            raise ConfigError("target_batches_per_actor must be positive")
        if self.downscale_delay_s < 0:
            raise ConfigError("downscale_delay_s must not be negative")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise ConfigError("gpus_per_actor and cpus_per_actor must not be negative")
        if self.max_sessions_per_actor < 1:
            raise ConfigError("max_sessions_per_actor must be at least 1")
        if self.task_timeout_s is not None and self.task_timeout_s <= 0:
            raise ConfigError("task_timeout_s must be positive (or None for no timeout)")
        if self.max_call_retries < 0:
            raise ConfigError("max_call_retries must not be negative")
        if self.restart_backoff_max_s <= 0:
            raise ConfigError("restart_backoff_max_s must be positive")
        if self.no_actor_grace_s < 0:
            raise ConfigError("no_actor_grace_s must not be negative")
        if self.min_chunk < 1:
            raise ConfigError("min_chunk must be at least 1")
        if self.min_chunk_work_s < 0:
            raise ConfigError("min_chunk_work_s must not be negative")
        if self.gpu_memory_limit_bytes is not None and self.gpu_memory_limit_bytes <= 0:
            raise ConfigError("gpu_memory_limit_bytes must be positive")
        if self.data_path not in DATA_PATHS:
            raise ConfigError(f"data_path must be one of {', '.join(DATA_PATHS)}")
        if self.memory_limit_bytes is not None and self.memory_limit_bytes < 256 * 1024 * 1024:
            raise ConfigError("memory_limit_bytes must be at least 256 MiB (a Ray worker needs it)")

    @property
    def elastic(self) -> bool:
        """True when the pool grows and shrinks between ``min_actors`` and ``max_actors``."""
        return self.min_actors is not None or self.max_actors is not None

    @property
    def lowest(self) -> int:
        """Fewest actors kept (``num_actors`` for a fixed pool)."""
        if self.min_actors is not None:
            return self.min_actors
        return 0 if self.max_actors is not None else self.num_actors

    @property
    def highest(self) -> int:
        """Most actors asked for (``num_actors`` for a fixed pool)."""
        if self.max_actors is not None:
            return self.max_actors
        return max(self.num_actors, self.lowest)


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """Everything ``python -m ray_alpcrun.bridge`` is told.

    ``pool=None`` sizes the pool from the Ray cluster's CPUs (as does
    ``size_pool_from_cluster``, keeping the pool's other settings); ``slots=None``
    (``--slots auto``) registers one logical worker per pool actor, and for an
    elastic pool follows it (see :func:`ray_alpcrun.pool.scaling.target_slots`).
    """

    services: ServiceConfig
    handler: str
    identity: WorkerIdentity = field(default_factory=WorkerIdentity)
    pool: PoolConfig | None = None
    # True: the pool's per-actor settings apply, its actor count is what the cluster can place.
    size_pool_from_cluster: bool = False
    slots: int | None = None
    ray_address: str | None = None
    # How to authenticate to the cluster at ray_address (RayAuth.read() in the CLI).
    ray_auth: RayAuth = field(default_factory=RayAuth)
    local: bool = False
    log_level: str = "info"
    log_json: bool = False
    drain_timeout_s: float = 30.0
    health_port: int | None = None
    health_host: str = "0.0.0.0"
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    max_connect_attempts: int | None = None
    session_linger_s: float = 30.0
    # The pool's data path when ``pool`` is None (else ``pool.data_path``).
    data_path: str = "direct"
    # "per-node": a bridge on every node that hosts pool actors, each registering
    # that node's logical workers; "one": this bridge alone serves every actor.
    bridges: str = "per-node"

    def __post_init__(self) -> None:
        if self.data_path not in DATA_PATHS:
            raise ConfigError(f"data_path must be one of {', '.join(DATA_PATHS)}")
        if self.bridges not in BRIDGE_MODES:
            raise ConfigError(f"bridges must be one of {', '.join(BRIDGE_MODES)}")
        if self.slots is not None and self.slots < 1:
            raise ConfigError("slots must be at least 1")
        if self.drain_timeout_s < 0:
            raise ConfigError("drain timeout must not be negative")
        if self.session_linger_s < 0:
            raise ConfigError("session linger must not be negative")
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError("backoff needs 0 < initial <= max")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"unknown log level {self.log_level!r}")


@dataclass(frozen=True, slots=True)
class DevServerConfig:
    """Settings of the local queue manager and caches (``ray_alpcrun.devserver``).

    Port 0 picks a free port. ``api_key=None`` makes the server generate one.
    ``tls`` holds the server certificate and key; its ``ca_cert``, when set,
    makes every service require client certificates signed by that CA.
    ``tls_ca`` is the CA bundle that signed the server certificate: the node
    cache verifies the central cache with it (default: the certificate itself,
    right for a self-signed one); ``tls.server_name`` overrides the name checked.
    ``unbind_idle_after_s``: a worker bound to a session that has nothing
    queued and nothing in flight on it is sent UNBIND after this long, so that
    idle workers go where the work is. ``stream_open_timeout_s``: a bound
    worker that has not opened its ``WorkerStream`` after this long is unbound.
    ``tick_s`` is how often timers (idle reaping, rebalancing) are checked.
    ``batch_timeout_s``: a worker that holds a batch longer than this without
    answering is treated as failed (its stream ends, its batches are re-queued,
    it is unbound); None (default) waits for ever, as long tasks may be legitimate.
    ``plaintext_services``: services (``"queue"``, ``"central"``, ``"node"``) that
    listen without TLS even when ``tls`` is set, e.g. ``("node",)`` for the
    guide's deployment (TLS queue manager, plaintext node cache on localhost).
    """

    host: str = "127.0.0.1"
    queue_port: int = 1337
    central_cache_port: int = 2337
    node_cache_port: int = 3337
    proto_package: str = DEFAULT_PROTO_PACKAGE
    api_key: str | None = field(default=None, repr=False)  # never in reprs, logs, tracebacks
    tls: TlsFiles | None = None
    tls_ca: str | None = None
    max_deliveries: int = 3
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    unbind_idle_after_s: float = 1.0
    stream_open_timeout_s: float = 30.0
    tick_s: float = 0.05
    batch_timeout_s: float | None = None
    plaintext_services: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.plaintext_services) - {"queue", "central", "node"}
        if unknown:
            raise ConfigError(
                f"plaintext_services: unknown service(s) {sorted(unknown)}; "
                "use queue, central or node"
            )
        if self.batch_timeout_s is not None and self.batch_timeout_s <= 0:
            raise ConfigError("batch_timeout_s must be positive (or None for no timeout)")
        for name in ("queue_port", "central_cache_port", "node_cache_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be in 0..65535, got {port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key must not be blank (leave it unset to generate one)")
        if self.max_deliveries < 1:
            raise ConfigError("max_deliveries must be at least 1")
        if self.max_message_bytes <= 0:
            raise ConfigError("max_message_bytes must be positive")
        if self.unbind_idle_after_s < 0 or self.stream_open_timeout_s <= 0 or self.tick_s <= 0:
            raise ConfigError("timer settings must be positive")
        if self.tls is not None and (self.tls.cert is None or self.tls.key is None):
            raise ConfigError("TLS for the dev server needs both a certificate and a key file")
