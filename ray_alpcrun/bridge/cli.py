"""``python -m ray_alpcrun.bridge``: serve ALPCRUN.CH batches on a Ray actor pool.

Ray is started (or joined) first, then the bridge actor; gRPC lives only in
that actor (and, with ``--local``, in the local services of this process).
SIGTERM/SIGINT drain in-flight batches and exit 0; a second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from types import FrameType
from typing import Any

from ray_alpcrun import errors
from ray_alpcrun.config import (
    DATA_PATHS,
    BridgeConfig,
    Env,
    PoolConfig,
)
from ray_alpcrun.handler import load_handler
from ray_alpcrun.logs import setup_logging
from ray_alpcrun.worker_cli import ENV_HELP, add_worker_flags, service_config, worker_identity

log = logging.getLogger("ray_alpcrun.bridge")

EPILOG = (
    ENV_HELP
    + """\
  METALCORE_NUM_THREADS         default for --actors

exit codes: 0 ok, 2 usage, 3 configuration, 4 API key rejected, 5 TLS failure,
6 handler cannot load, 7 queue manager unreachable, 130 interrupted twice
"""
)


def build_parser(env: Env) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_alpcrun.bridge",
        description="Serve ALPCRUN.CH task batches with a pool of Ray actors.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_worker_flags(p, env)
    a = p.add_argument
    a("--actors", type=int, default=env.num_threads, help="pool actors (default: cluster CPUs)")
    a("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor, fractional ok; 0 = CPU")
    a("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per actor")
    a("--slots", type=int, default=None, help="logical workers registered (default: --actors)")
    a("--ray-address", default=None, help="Ray cluster to join ('auto'); default: start Ray")
    a("--task-timeout", type=float, default=None, help="seconds per task before it is failed")
    a("--drain-timeout", type=float, default=30.0, help="seconds to finish batches on stop")
    a("--max-sessions-per-actor", type=int, default=32, help="sessions kept per actor")
    a("--gpu-memory-limit", type=int, default=None, help="CuPy pool cap per actor, bytes")
    a("--actor-memory-limit", type=int, default=None, help="private memory cap per actor, bytes")
    a(
        "--data-path",
        choices=DATA_PATHS,
        default="calls",
        help="how sub-batches reach the actors: Ray compiled graphs, or ordinary actor calls",
    )
    a("--backoff-max", type=float, default=10.0, help="longest reconnect pause, seconds")
    a("--health-port", type=int, default=None, help="serve /healthz, /readyz, /metrics here")
    a("--health-host", default="0.0.0.0", help="address the health endpoint listens on")
    a("--log-json", action="store_true", help="log JSON lines")
    a("--local", action="store_true", help="also run the local queue manager and caches")
    return p


def config_from_args(args: argparse.Namespace, env: Env) -> BridgeConfig:
    services = service_config(args, env)
    identity = worker_identity(args)
    actors = args.actors if args.actors is not None else 0
    pool = (
        PoolConfig(
            num_actors=actors,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
            max_sessions_per_actor=args.max_sessions_per_actor,
            task_timeout_s=args.task_timeout,
            gpu_memory_limit_bytes=args.gpu_memory_limit,
            memory_limit_bytes=args.actor_memory_limit,
            data_path=args.data_path,
        )
        if actors
        else None
    )
    return BridgeConfig(
        services=services,
        identity=identity,
        handler=args.handler,
        pool=pool,
        data_path=args.data_path,
        slots=args.slots,
        ray_address=args.ray_address,
        local=args.local,
        log_level=args.log_level,
        log_json=args.log_json,
        drain_timeout_s=args.drain_timeout,
        health_port=args.health_port,
        health_host=args.health_host,
        backoff_max_s=args.backoff_max,
        max_connect_attempts=args.connect_attempts,
    )


def main(argv: Sequence[str] | None = None) -> int:
    env = Env.read()
    args = build_parser(env).parse_args(argv)
    try:
        config = config_from_args(args, env)
        setup_logging(config.log_level, config.log_json)
        load_handler(config.handler)  # fail fast, before Ray starts
    except errors.HandlerError as exc:
        print(f"ray_alpcrun.bridge: handler: {exc}", file=sys.stderr)
        return errors.EXIT_HANDLER
    except errors.ConfigError as exc:
        print(f"ray_alpcrun.bridge: configuration: {exc}", file=sys.stderr)
        return errors.EXIT_CONFIG
    if config.services.api_key is None and not config.local:
        print(
            "ray_alpcrun.bridge: no API key: set METALCORE_API_KEY or --api-key",
            file=sys.stderr,
        )
        return errors.EXIT_AUTH
    return run(config)


def run(config: BridgeConfig) -> int:
    import ray

    from ray_alpcrun.bridge.launch import start_bridge

    started_ray = not ray.is_initialized()
    if started_ray:
        # Ray first: starting it after gRPC is active prints fork warnings.
        ray.init(address=config.ray_address, configure_logging=False, log_to_driver=True)
    services: Any = None
    try:
        if config.local:
            try:
                config, services = _start_local(config)
            except (OSError, RuntimeError, errors.AlpcrunError) as exc:
                print(
                    f"ray_alpcrun.bridge: cannot start the local services: {exc}", file=sys.stderr
                )
                return errors.EXIT_CONFIG
        handle = start_bridge(config)
        return _wait(handle)
    finally:
        if services is not None:
            services.__exit__(None, None, None)
        if started_ray:
            ray.shutdown()


def _start_local(config: BridgeConfig) -> tuple[BridgeConfig, Any]:
    from ray_alpcrun.config import DevServerConfig
    from ray_alpcrun.devserver import LocalServices

    queue_port = int(config.services.queue_address.rpartition(":")[2])
    cache_port = int(config.services.cache_address.rpartition(":")[2])
    services = LocalServices(
        DevServerConfig(
            queue_port=queue_port,
            node_cache_port=cache_port,
            api_key=config.services.api_key,
            proto_package=config.services.proto_package,
            max_message_bytes=config.services.max_message_bytes,
        )
    )
    services.__enter__()
    print(
        f"local ALPCRUN.CH services: queue={services.queue_address} "
        f"central-cache={services.central_cache_address} node-cache={services.node_cache_address}",
        flush=True,
    )
    if config.services.api_key is None:
        # A generated key: clients need it to connect, so show it once.
        print(f"  clients connect with METALCORE_API_KEY={services.api_key}", flush=True)
    services_config = replace(
        config.services,
        queue_address=services.queue_address,
        cache_address=services.node_cache_address,
        central_cache_address=services.central_cache_address,
        api_key=services.api_key,
    )
    return replace(config, services=services_config), services


def _wait(handle: Any) -> int:
    """Block until the bridge ends; the first signal drains, the second kills."""
    import ray

    signals = {"count": 0}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info("signal %s: draining (send again to stop at once)", signum)
            handle.stop(drain=True)
        else:
            # Acted on in the loop below: an exception raised inside ray.wait() does
            # not reliably surface as itself (the process exited 1, not 130).
            log.warning("second signal: stopping at once")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            if signals["count"] > 1:
                handle.kill()
                return errors.EXIT_INTERRUPTED
            done, _ = ray.wait([handle.run_ref], timeout=0.2)
            if done:
                break
        code, reason = ray.get(handle.run_ref)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if reason:
        print(f"ray_alpcrun.bridge: {reason}", file=sys.stderr)
    return int(code)
