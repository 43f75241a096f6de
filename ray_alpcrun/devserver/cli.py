"""``python -m ray_alpcrun.devserver``: run the local queue manager, central
cache and node cache until SIGINT/SIGTERM.

Exit codes: 0 stopped by a signal, 2 bad flags, 3 bad settings (a port in use).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

from ray_alpcrun import errors
from ray_alpcrun.clikit import Output, Parser
from ray_alpcrun.config import ENV_API_KEY, DevServerConfig, Env
from ray_alpcrun.devserver.server import LocalServices
from ray_alpcrun.logs import setup_logging
from ray_alpcrun.transport import DEFAULT_MAX_MESSAGE_BYTES, TlsFiles
from ray_alpcrun.wire import DEFAULT_PROTO_PACKAGE

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CONFIG = 3
PROG = "ray_alpcrun.devserver"
EPILOG = """\
exit codes:
  0    stopped by SIGTERM/SIGINT
  2    usage: an unknown flag or a bad value
  3    configuration: bad settings, a port in use
"""

_DEFAULTS = DevServerConfig()


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m ray_alpcrun.devserver",
        epilog=EPILOG,
        description=(
            "Local ALPCRUN.CH services in one process: the queue manager (Queue service), "
            "the central cache and a node cache (Cache service). Every call must carry the "
            "API key in the 'api_key' metadata. Port 0 picks a free port."
        ),
    )
    p.add_argument("--host", default=_DEFAULTS.host, help="interface to listen on (%(default)s)")
    p.add_argument(
        "--queue-port",
        type=int,
        default=_DEFAULTS.queue_port,
        help="queue manager port (%(default)s)",
    )
    p.add_argument(
        "--central-cache-port",
        type=int,
        default=_DEFAULTS.central_cache_port,
        help="central cache port (%(default)s)",
    )
    p.add_argument(
        "--node-cache-port",
        type=int,
        default=_DEFAULTS.node_cache_port,
        help="node cache port (%(default)s)",
    )
    p.add_argument(
        "--proto-package",
        default=DEFAULT_PROTO_PACKAGE,
        help="proto package in the method paths, e.g. metalcore.api.v1; '' for none (%(default)s)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"shared secret (default: ${ENV_API_KEY}; if unset, one is generated and printed)",
    )
    p.add_argument("--tls-cert", default=None, help="PEM server certificate (enables TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-ca",
        default=None,
        help="PEM CA bundle that signed --tls-cert (the node cache verifies the central cache "
        "with it; default: --tls-cert itself, right for a self-signed certificate)",
    )
    p.add_argument(
        "--tls-client-ca",
        default=None,
        help="PEM CA bundle; when given, clients must present a certificate it signed",
    )
    p.add_argument(
        "--plaintext",
        action="append",
        default=[],
        choices=["queue", "central", "node"],
        metavar="SERVICE",
        help="serve this service (queue, central, node) without TLS even with --tls-cert; "
        "repeatable (e.g. --plaintext node: the guide's plaintext node cache)",
    )
    p.add_argument(
        "--max-deliveries",
        type=int,
        default=_DEFAULTS.max_deliveries,
        help="deliveries of a batch without an answer before it is dead-lettered (%(default)s)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest gRPC message sent or received (%(default)s)",
    )
    p.add_argument(
        "--unbind-idle-after",
        type=float,
        default=_DEFAULTS.unbind_idle_after_s,
        metavar="SECONDS",
        help="unbind a worker whose session has had nothing for it this long (%(default)s)",
    )
    p.add_argument(
        "--batch-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="re-queue the batches of a worker that holds one longer than this without an "
        "answer, and unbind it (default: no timeout)",
    )
    p.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log level (default: $METALCORE_LOG_LEVEL or info)",
    )
    p.add_argument("--log-json", action="store_true", help="every line printed is a JSON object")
    return p


def config_from_args(args: argparse.Namespace, env: Env) -> DevServerConfig:
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca or args.tls_ca:
        if not (args.tls_cert and args.tls_key):
            raise errors.ConfigError("--tls-cert and --tls-key go together")
        tls = TlsFiles(ca_cert=args.tls_client_ca, cert=args.tls_cert, key=args.tls_key)
    return DevServerConfig(
        host=args.host,
        queue_port=args.queue_port,
        central_cache_port=args.central_cache_port,
        node_cache_port=args.node_cache_port,
        proto_package=args.proto_package,
        api_key=args.api_key or env.api_key,
        tls=tls,
        tls_ca=args.tls_ca,
        max_deliveries=args.max_deliveries,
        max_message_bytes=args.max_message_bytes,
        unbind_idle_after_s=args.unbind_idle_after,
        batch_timeout_s=args.batch_timeout,
        plaintext_services=tuple(args.plaintext),
    )


async def _serve(svc: LocalServices, out: Output) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with svc:
        say = out.say
        say(f"queue manager  {svc.queue_address}", service="queue", address=svc.queue_address)
        say(
            f"central cache  {svc.central_cache_address}",
            service="central_cache",
            address=svc.central_cache_address,
        )
        say(
            f"node cache     {svc.node_cache_address}",
            service="node_cache",
            address=svc.node_cache_address,
        )
        say(f"proto package  {svc.proto_package or '(none)'}", proto_package=svc.proto_package)
        if svc.api_key_generated:
            # The one place a key is printed: it was generated for the user to copy.
            say(f"generated API key (export {ENV_API_KEY}=...): {svc.api_key}")
        say("ready; stop with Ctrl-C")
        await stop.wait()
    say("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the services until SIGINT/SIGTERM; returns the exit code."""
    args = build_parser().parse_args(argv)
    out = Output(PROG, args.log_json)
    try:
        env = Env.read()
        setup_logging(args.log_level or env.log_level or "info", args.log_json)
        svc = LocalServices(config_from_args(args, env))
        asyncio.run(_serve(svc, out))
    except errors.ConfigError as exc:
        out.fail(f"configuration: {exc}")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        # A signal before the services were up (asyncio's handlers come later).
        return EXIT_OK
    return EXIT_OK
