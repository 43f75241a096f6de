"""``python -m ray_alpcrun.bridge``: serve ALPCRUN.CH batches on a Ray actor pool.

The handler, the API key and the TLS trust are checked first (the key against
the node cache, on a channel closed before Ray starts), then Ray is started or
joined (an address is checked before ``ray.init``, see ``rayjoin``), then the
bridge actor; gRPC serves only in that actor (and, with ``--local``, in the
local services of this process).
A signal during startup stops it after the step in progress (exit 130); once serving, SIGTERM/SIGINT
drain: batches that arrive are no longer started, those running finish and are
answered, then exit 0; a second signal exits at once (130).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import replace
from types import FrameType
from typing import TYPE_CHECKING

from ray_alpcrun import errors
from ray_alpcrun.bridge.launch import worker_settings
from ray_alpcrun.bridge.preflight import preflight
from ray_alpcrun.clikit import Output, Parser
from ray_alpcrun.config import (
    BRIDGE_MODES,
    DATA_PATHS,
    BridgeConfig,
    Env,
    PoolConfig,
    RayAuth,
)
from ray_alpcrun.handler import load_handler
from ray_alpcrun.logs import fields, setup_logging
from ray_alpcrun.worker_cli import (
    ENV_HELP,
    EXIT_CODES_HELP,
    add_worker_flags,
    service_config,
    warn_plaintext_cache,
    worker_identity,
)

if TYPE_CHECKING:
    from ray_alpcrun.bridge.launch import BridgeHandle
    from ray_alpcrun.devserver import LocalServices

log = logging.getLogger("ray_alpcrun.bridge")

EPILOG = (
    ENV_HELP
    + """\
  METALCORE_NUM_THREADS         default for --actors

"""
    + EXIT_CODES_HELP
)
PROG = "ray_alpcrun.bridge"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A signal arrived before the bridge was serving (a BaseException, as
    KeyboardInterrupt: no ``except Exception`` on the way may swallow it)."""


def build_parser(env: Env) -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m ray_alpcrun.bridge",
        description="Serve ALPCRUN.CH task batches with a pool of Ray actors.",
        epilog=EPILOG,
    )
    add_worker_flags(p, env)
    a = p.add_argument
    a(
        "--actors",
        type=int,
        default=env.num_threads,
        help="pool actors, at least 1 (default: as many as the cluster can place)",
    )
    a("--min-actors", type=int, default=None, help="elastic pool: fewest actors (0 allowed)")
    a("--max-actors", type=int, default=None, help="elastic pool: most actors (needed for it)")
    a(
        "--target-batches-per-actor",
        type=float,
        default=1.0,
        help="elastic pool: grow while batches in flight per actor stay above this",
    )
    a(
        "--downscale-delay",
        type=float,
        default=30.0,
        help="elastic pool: seconds of lower load before idle actors are released",
    )
    a("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor, fractional ok; 0 = CPU")
    a("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per actor")
    a(
        "--slots",
        type=_slots,
        default=None,
        help="logical workers registered: a number, or 'auto' (default): one per "
        "actor, following an elastic pool with one spare while it may grow",
    )
    a("--ray-address", default=None, help="Ray cluster to join ('auto'); default: start Ray")
    a(
        "--task-timeout",
        type=float,
        default=None,
        help="fail a sub-batch that runs too long: its deadline is this many seconds times "
        "the tasks on its actor when it is sent there (its own and those queued before "
        "it) plus 1 s; a batch that waits this long for a live actor while actor starts "
        "fail is answered the same; default: no limit",
    )
    a(
        "--restart-backoff-max",
        type=float,
        default=30.0,
        help="a lost pool actor is replaced for as long as the bridge runs; the pause "
        "between failed start attempts doubles from 0.5 s up to this many seconds",
    )
    a(
        "--no-actor-grace",
        type=float,
        default=60.0,
        help="seconds without a live pool actor (batches wait meanwhile) before the "
        "bridge stops taking work: its logical workers unregister and the batches it "
        "holds are answered dead, until an actor is live again (an elastic pool waiting "
        "for room is exempt; for it the time counts while actor starts fail)",
    )
    a(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds to finish the batches already running",
    )
    a(
        "--session-linger",
        type=float,
        default=30.0,
        help="seconds a session's state (and its on_session_end) waits after the last "
        "slot serving it is unbound, in case it is bound again; a stop ends it at once",
    )
    a("--max-sessions-per-actor", type=int, default=32, help="sessions kept per actor")
    a("--gpu-memory-limit", type=int, default=None, help="CuPy pool cap per actor, bytes")
    a("--actor-memory-limit", type=int, default=None, help="private memory cap per actor, bytes")
    a(
        "--data-path",
        choices=DATA_PATHS,
        default="direct",
        help="how sub-batches reach the actors: a Unix socket per actor on this node"
        " (direct; actors on other nodes get ordinary calls) or ordinary Ray actor calls",
    )
    a(
        "--bridges",
        choices=BRIDGE_MODES,
        default="per-node",
        help="per-node: a bridge on each node with pool actors serves them under that node's"
        " identity and cache (--node/--pod name this node's); one: this bridge serves all",
    )
    a("--backoff-max", type=float, default=10.0, help="longest reconnect pause, seconds")
    a("--health-port", type=int, default=None, help="serve /healthz, /readyz, /metrics here")
    a("--health-host", default="0.0.0.0", help="address the health endpoint listens on")
    a("--log-json", action="store_true", help="every line printed is a JSON object")
    a("--local", action="store_true", help="also run the local queue manager and caches")
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace, env: Env) -> BridgeConfig:
    services = service_config(args, env)
    identity = worker_identity(args)
    if args.actors is not None and args.actors < 1:
        raise errors.ConfigError(f"--actors must be at least 1, got {args.actors}")
    elastic = args.min_actors is not None or args.max_actors is not None
    actors = args.actors or 1
    lowest = 0
    if elastic:
        if args.max_actors is None:
            raise errors.ConfigError("--min-actors needs --max-actors (the elastic pool's ceiling)")
        if args.actors is not None and not env_actors(args, env):
            raise errors.ConfigError("give either --actors N (fixed) or --min/--max-actors")
        lowest = 0 if args.min_actors is None else args.min_actors
        actors = max(1, lowest)
    # Always built: the per-actor flags apply whether or not --actors is given
    # (without it, a fixed pool is sized from the cluster by start_bridge).
    pool = PoolConfig(
        num_actors=actors,
        min_actors=lowest if elastic else None,
        max_actors=args.max_actors if elastic else None,
        target_batches_per_actor=args.target_batches_per_actor,
        downscale_delay_s=args.downscale_delay,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        max_sessions_per_actor=args.max_sessions_per_actor,
        task_timeout_s=args.task_timeout,
        restart_backoff_max_s=args.restart_backoff_max,
        no_actor_grace_s=args.no_actor_grace,
        gpu_memory_limit_bytes=args.gpu_memory_limit,
        memory_limit_bytes=args.actor_memory_limit,
        data_path=args.data_path,
    )
    return BridgeConfig(
        services=services,
        identity=identity,
        handler=args.handler,
        pool=pool,
        size_pool_from_cluster=args.actors is None and not elastic,
        data_path=args.data_path,
        bridges=args.bridges,
        slots=args.slots,
        ray_address=args.ray_address,
        ray_auth=RayAuth.read(),
        local=args.local,
        log_level=args.log_level,
        log_json=args.log_json,
        drain_timeout_s=args.drain_timeout,
        health_port=args.health_port,
        health_host=args.health_host,
        backoff_max_s=args.backoff_max,
        max_connect_attempts=args.connect_attempts,
        session_linger_s=args.session_linger,
    )


def _slots(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def env_actors(args: argparse.Namespace, env: Env) -> bool:
    """True when --actors came only from METALCORE_NUM_THREADS, not the command line."""
    return env.num_threads is not None and args.actors == env.num_threads


def main(argv: Sequence[str] | None = None) -> int:
    # From the first moment: a signal during startup stops it (Ray's own SIGTERM
    # handler, installed by ray.init, would exit 15; SIGINT could be lost).
    startup = StartupSignals()
    previous = {s: signal.signal(s, startup) for s in _SIGNALS}
    out = Output(PROG)
    try:
        return _main(argv, out, startup)
    except Interrupted as exc:
        out.fail(f"interrupted during startup ({exc})")
        return errors.EXIT_INTERRUPTED
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class StartupSignals:
    """The signal handler until the bridge serves. The first signal is noted and
    acted on at the next step of the startup (raising it inside ``ray.init`` or a
    Ray call could leave Ray half-started and its shutdown hanging); a second
    one raises at once."""

    def __init__(self) -> None:
        self.pending: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)
        if len(self.pending) > 1:
            raise Interrupted(signal.Signals(signum).name)

    def check(self) -> None:
        """Raise Interrupted if a signal arrived."""
        if self.pending:
            raise Interrupted(signal.Signals(self.pending[0]).name)


def _main(argv: Sequence[str] | None, out: Output, startup: StartupSignals) -> int:
    env = Env.read()
    args = build_parser(env).parse_args(argv)
    out.json_lines = args.log_json
    try:
        config = config_from_args(args, env)
        setup_logging(config.log_level, config.log_json)
        warn_plaintext_cache(config.services)
        load_handler(config.handler)  # fail fast, before Ray starts
        if config.services.api_key is None and not config.local:
            out.fail("no API key: set METALCORE_API_KEY or --api-key")
            return errors.EXIT_AUTH
        if not config.local:
            # The actor's check of the key and TLS trust, here before Ray starts: a
            # wrong key exits 4 in a second. Its channel is closed before Ray starts.
            asyncio.run(preflight(worker_settings(config, 1)))
    except errors.HandlerError as exc:
        out.fail(f"handler: {exc}")
        return errors.EXIT_HANDLER
    except errors.ConfigError as exc:
        out.fail(f"configuration: {exc}")
        return errors.EXIT_CONFIG
    except errors.FatalError as exc:
        out.fail(exc.reason)
        return exc.exit_code
    startup.check()
    return run(config, out, startup)


def run(
    config: BridgeConfig, out: Output | None = None, startup: StartupSignals | None = None
) -> int:
    import ray

    from ray_alpcrun.bridge.launch import start_bridge
    from ray_alpcrun.bridge.raylogs import format_ray_logger, forward_actor_output

    format_ray_logger(config.log_json)
    out = out or Output(PROG, config.log_json)
    startup = startup or StartupSignals()
    started_ray = not ray.is_initialized()
    services: LocalServices | None = None
    try:
        if started_ray:
            # Ray first: starting it after gRPC is active prints fork warnings.
            try:
                _init_ray(config, startup)
            except errors.ConfigError as exc:
                out.fail(str(exc))
                return errors.EXIT_CONFIG
        startup.check()
        forward_actor_output(config.log_json)
        if config.local:
            try:
                config, services = _start_local(config, out)
            except (OSError, RuntimeError, errors.AlpcrunError) as exc:
                out.fail(f"cannot start the local services: {exc}")
                return errors.EXIT_CONFIG
            startup.check()
        handle = start_bridge(config)
        if startup.pending:
            handle.kill()
            startup.check()
        return _wait(handle, out)
    finally:
        # A signal now may not raise inside the clean-up; it ends the process.
        for s in _SIGNALS:
            signal.signal(s, _exit_now)
        if services is not None:
            services.__exit__(None, None, None)
        if started_ray:
            ray.shutdown()


def _exit_now(signum: int, frame: FrameType | None) -> None:
    os._exit(errors.EXIT_INTERRUPTED)


def _init_ray(config: BridgeConfig, startup: StartupSignals) -> None:
    import ray

    from ray_alpcrun.bridge.rayjoin import prepare_join

    log.info("starting Ray", extra=fields(address=config.ray_address or "(new local cluster)"))
    # Joining by address: a token the cluster wants, or an address where nothing
    # listens, is told now in one line, not after Ray's 20 s of retries.
    address = prepare_join(config.ray_address, config.ray_auth)
    # ray.init installs a SIGTERM handler that exits 15 from wherever it is; keep
    # ours (the private hook may move: then the SystemExit below is the fallback).
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    saved = getattr(utils, "set_sigterm_handler", None)
    if saved is not None:
        utils.set_sigterm_handler = lambda handler: None  # type: ignore[union-attr]
    try:
        ray.init(address=address, configure_logging=False, log_to_driver=True)
    except SystemExit as exc:
        if exc.code == signal.SIGTERM:
            raise Interrupted("SIGTERM") from None
        raise
    finally:
        if saved is not None:
            utils.set_sigterm_handler = saved  # type: ignore[union-attr]
        signal.signal(signal.SIGTERM, startup)


def _start_local(config: BridgeConfig, out: Output) -> tuple[BridgeConfig, LocalServices]:
    from ray_alpcrun.config import DevServerConfig
    from ray_alpcrun.devserver import LocalServices

    queue_port = int(config.services.queue_address.rpartition(":")[2])
    cache_port = int(config.services.cache_address.rpartition(":")[2])
    services = LocalServices(
        DevServerConfig(
            queue_port=queue_port,
            node_cache_port=cache_port,
            # Port 0 for the queue asks for free ports: the central cache's too.
            central_cache_port=0 if queue_port == 0 else DevServerConfig().central_cache_port,
            api_key=config.services.api_key,
            proto_package=config.services.proto_package,
            max_message_bytes=config.services.max_message_bytes,
        )
    )
    services.__enter__()
    out.say(
        f"local ALPCRUN.CH services: queue={services.queue_address} "
        f"central-cache={services.central_cache_address} node-cache={services.node_cache_address}"
    )
    if config.services.api_key is None:
        # A generated key: clients need it to connect, so show it once.
        out.say(f"  clients connect with METALCORE_API_KEY={services.api_key}")
    services_config = replace(
        config.services,
        queue_address=services.queue_address,
        cache_address=services.node_cache_address,
        central_cache_address=services.central_cache_address,
        api_key=services.api_key,
    )
    return replace(config, services=services_config), services


def _wait(handle: BridgeHandle, out: Output) -> int:
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

    for s in _SIGNALS:
        signal.signal(s, on_signal)
    while True:
        if signals["count"] > 1:
            handle.kill()
            return errors.EXIT_INTERRUPTED
        done, _ = ray.wait([handle.run_ref], timeout=0.2)
        if done:
            break
    code, reason = handle.outcome()
    if reason:
        out.fail(reason)
    elif code == errors.EXIT_OK:
        counts = handle.drain_counts()
        done = "" if counts is None else f" {counts[0]} batches drained, {counts[1]} not started,"
        log.info("stopped:%s exit %d", done, code)
    return int(code)
