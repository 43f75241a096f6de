"""``python -m ray_alpcrun.refworker``: the plain single-process worker (no Ray).

SIGTERM/SIGINT finish the batch in hand, half-close and exit 0; a second
signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from ray_alpcrun import errors
from ray_alpcrun.config import (
    DEFAULT_NODE_CACHE_ADDR,
    DEFAULT_QUEUE_ADDR,
    Env,
    ServiceConfig,
    WorkerIdentity,
)
from ray_alpcrun.handler import load_handler
from ray_alpcrun.logs import setup_logging
from ray_alpcrun.refworker.thread import GRPC_SETTLE_S
from ray_alpcrun.refworker.worker import ReferenceWorker, ReferenceWorkerConfig
from ray_alpcrun.transport import DEFAULT_MAX_MESSAGE_BYTES, TlsFiles
from ray_alpcrun.wire import DEFAULT_PROTO_PACKAGE

log = logging.getLogger("ray_alpcrun.refworker")

EPILOG = """\
environment (flags win):
  METALCORE_API_KEY             API key for every call (or --api-key)
  METALCORE_WORKER_NODE         node name (default: this host)
  METALCORE_WORKER_POD          pod name (default: HOST-PID)
  METALCORE_QUEUE_MANAGER_ADDR  default for --queue
  METALCORE_CACHE_ADDR          default for --cache
  METALCORE_LOG_LEVEL           default for --log-level

exit codes: 0 ok, 1 other failure, 2 usage, 3 configuration, 4 API key rejected,
6 handler cannot load, 7 queue manager unreachable, 130 interrupted twice
"""


def build_parser(env: Env) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_alpcrun.refworker",
        description="Serve ALPCRUN.CH task batches with one handler in this process (no Ray).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--queue", default=env.queue_addr or DEFAULT_QUEUE_ADDR, help="queue manager HOST:PORT")
    a("--cache", default=env.cache_addr or DEFAULT_NODE_CACHE_ADDR, help="node cache HOST:PORT")
    a("--handler", required=True, help="MODULE:OBJECT, a function or a Handler class")
    a("--proto-package", default=DEFAULT_PROTO_PACKAGE, help="proto package in method paths")
    a("--api-key", default=None, help="API key (default: METALCORE_API_KEY)")
    a("--ca-cert", default=None, help="CA bundle: use TLS to the queue manager and cache")
    a("--tls-server-name", default=None, help="expected server name in the certificates")
    a("--node", default=env.worker_node, help="worker node name")
    a("--pod", default=env.worker_pod, help="worker pod name")
    a("--connect-timeout", type=float, default=10.0, help="seconds to wait for the channel")
    a("--connect-attempts", type=int, default=None, help="give up after N failed connects")
    a("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, help="gRPC limit")
    a("--log-level", default=env.log_level or "info", help="debug, info, warning, error")
    return p


def config_from_args(args: argparse.Namespace, env: Env) -> ReferenceWorkerConfig:
    tls = TlsFiles(ca_cert=args.ca_cert, server_name=args.tls_server_name) if args.ca_cert else None
    service = ServiceConfig(
        queue_address=args.queue,
        cache_address=args.cache,
        api_key=args.api_key or env.api_key,
        proto_package=args.proto_package,
        tls=tls,
        max_message_bytes=args.max_message_bytes,
    )
    identity = WorkerIdentity(**{k: v for k, v in (("node", args.node), ("pod", args.pod)) if v})
    return ReferenceWorkerConfig(
        service=service,
        identity=identity,
        connect_timeout_s=args.connect_timeout,
        max_connect_attempts=args.connect_attempts,
    )


def main(argv: Sequence[str] | None = None) -> int:
    env = Env.read()
    args = build_parser(env).parse_args(argv)
    try:
        setup_logging(args.log_level)
        config = config_from_args(args, env)
        worker = ReferenceWorker(config, load_handler(args.handler))
    except errors.HandlerError as exc:
        print(f"ray_alpcrun.refworker: handler: {exc}", file=sys.stderr)
        return errors.EXIT_HANDLER
    except (errors.ConfigError, ValueError) as exc:
        print(f"ray_alpcrun.refworker: configuration: {exc}", file=sys.stderr)
        return errors.EXIT_CONFIG
    try:
        asyncio.run(_run(worker))
    except errors.AuthError as exc:
        print(f"ray_alpcrun.refworker: API key rejected: {exc}", file=sys.stderr)
        return errors.EXIT_AUTH
    except errors.RpcError as exc:
        print(f"ray_alpcrun.refworker: {exc}", file=sys.stderr)
        return errors.EXIT_UNAVAILABLE
    except errors.AlpcrunError as exc:
        print(f"ray_alpcrun.refworker: {exc}", file=sys.stderr)
        return errors.EXIT_FAILURE
    except KeyboardInterrupt:
        return errors.EXIT_INTERRUPTED
    return errors.EXIT_OK


async def _run(worker: ReferenceWorker) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    signals = {"count": 0}

    def on_signal(signum: int) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info("signal %s: finishing the batch in hand (send again to stop at once)", signum)
            worker.stop()
        elif task is not None:
            task.cancel()

    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, on_signal, s)
    try:
        await worker.run()
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    # Let grpc complete the operations of cancelled calls before asyncio.run closes the loop.
    await asyncio.sleep(GRPC_SETTLE_S)
