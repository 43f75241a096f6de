"""``python -m ray_alpcrun.refworker``: the plain single-process worker (no Ray).

SIGTERM/SIGINT finish the batch in hand, half-close and exit 0; a second
signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence

from ray_alpcrun import errors
from ray_alpcrun.clikit import Output, Parser
from ray_alpcrun.config import (
    Env,
)
from ray_alpcrun.handler import load_handler
from ray_alpcrun.logs import setup_logging
from ray_alpcrun.refworker.thread import GRPC_SETTLE_S
from ray_alpcrun.refworker.worker import ReferenceWorker, ReferenceWorkerConfig
from ray_alpcrun.worker_cli import (
    ENV_HELP,
    EXIT_CODES_HELP,
    add_worker_flags,
    service_config,
    warn_plaintext_cache,
    worker_identity,
)

log = logging.getLogger("ray_alpcrun.refworker")

EPILOG = ENV_HELP + "\n" + EXIT_CODES_HELP
PROG = "ray_alpcrun.refworker"


def build_parser(env: Env) -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m ray_alpcrun.refworker",
        description="Serve ALPCRUN.CH task batches with one handler in this process (no Ray).",
        epilog=EPILOG,
    )
    add_worker_flags(p, env)
    p.add_argument(
        "--connect-timeout", type=float, default=10.0, help="seconds to wait for the channel"
    )
    p.add_argument("--log-json", action="store_true", help="every line printed is a JSON object")
    return p


def config_from_args(args: argparse.Namespace, env: Env) -> ReferenceWorkerConfig:
    service = service_config(args, env)
    identity = worker_identity(args)
    return ReferenceWorkerConfig(
        service=service,
        identity=identity,
        connect_timeout_s=args.connect_timeout,
        max_connect_attempts=args.connect_attempts,
    )


def main(argv: Sequence[str] | None = None) -> int:
    env = Env.read()
    args = build_parser(env).parse_args(argv)
    out = Output(PROG, args.log_json)
    try:
        setup_logging(args.log_level, args.log_json)
        config = config_from_args(args, env)
        warn_plaintext_cache(config.service)
        worker = ReferenceWorker(config, load_handler(args.handler))
    except errors.HandlerError as exc:
        out.fail(f"handler: {exc}")
        return errors.EXIT_HANDLER
    except (errors.ConfigError, ValueError) as exc:
        out.fail(f"configuration: {exc}")
        return errors.EXIT_CONFIG
    try:
        asyncio.run(_run(worker))
    except errors.AuthError as exc:
        out.fail(f"API key rejected: {exc}")
        return errors.EXIT_AUTH
    except errors.RpcError as exc:
        # The same words as the bridge's.
        out.fail(
            f"queue manager at {config.service.queue_address} unreachable after "
            f"{config.max_connect_attempts} attempts ({exc})"
        )
        return errors.EXIT_UNAVAILABLE
    except errors.AlpcrunError as exc:
        out.fail(str(exc))
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
