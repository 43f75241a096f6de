"""Command-line pieces shared by the two worker programs (bridge and reference
worker): the flags that say how to reach the services and who the worker is."""

from __future__ import annotations

import argparse
import ipaddress
import logging

from ray_alpcrun.config import (
    DEFAULT_NODE_CACHE_ADDR,
    DEFAULT_QUEUE_ADDR,
    Env,
    ServiceConfig,
    WorkerIdentity,
)
from ray_alpcrun.transport import DEFAULT_MAX_MESSAGE_BYTES, TlsFiles
from ray_alpcrun.wire import DEFAULT_PROTO_PACKAGE

log = logging.getLogger(__name__)

ENV_HELP = """\
environment (flags win):
  METALCORE_API_KEY             API key for every call (or --api-key)
  METALCORE_WORKER_NODE         node name (default: this host)
  METALCORE_WORKER_POD          pod name (default: HOST-PID)
  METALCORE_QUEUE_MANAGER_ADDR  default for --queue
  METALCORE_CACHE_ADDR          default for --cache
  METALCORE_CA_CERT             default for --ca-cert (TLS to the queue manager)
  METALCORE_CACHE_CA_CERT       default for --cache-ca-cert (TLS to the node cache)
  METALCORE_LOG_LEVEL           default for --log-level
"""


EXIT_CODES_HELP = """\
exit codes:
  0    stopped by SIGTERM/SIGINT after draining (or the queue manager ended it)
  1    other failure
  2    usage: an unknown flag or a bad value
  3    configuration: bad settings, a port in use, resources the cluster cannot place,
       the bridge actor died before it served (could not start on the cluster),
       a Ray cluster (--ray-address) that cannot be joined
  4    API key missing or rejected
  5    TLS failure (certificate not trusted)
  6    the handler cannot be loaded
  7    queue manager unreachable (after --connect-attempts)
  130  a signal during startup, or a second signal while draining
"""


def add_worker_flags(p: argparse.ArgumentParser, env: Env) -> None:
    """--queue, --cache, --handler, --proto-package, the API key, TLS, identity, limits."""
    a = p.add_argument
    a("--queue", default=env.queue_addr or DEFAULT_QUEUE_ADDR, help="queue manager HOST:PORT")
    a("--cache", default=env.cache_addr or DEFAULT_NODE_CACHE_ADDR, help="node cache HOST:PORT")
    a("--handler", required=True, help="MODULE:OBJECT, a function or a Handler class (required)")
    a("--proto-package", default=DEFAULT_PROTO_PACKAGE, help="proto package in method paths")
    a("--api-key", default=None, help="API key (default: METALCORE_API_KEY)")
    a("--ca-cert", default=env.ca_cert, help="CA bundle: use TLS to the queue manager")
    a(
        "--cache-ca-cert",
        default=env.cache_ca_cert,
        help="CA bundle: use TLS to the node cache (default: plaintext, as the guide deploys it)",
    )
    a("--client-cert", default=None, help="client certificate for mutual TLS")
    a("--client-key", default=None, help="client key for mutual TLS")
    a("--tls-server-name", default=None, help="expected server name in the certificates")
    a("--node", default=env.worker_node, help="worker node name")
    a("--pod", default=env.worker_pod, help="worker pod name")
    a(
        "--connect-attempts",
        type=int,
        default=None,
        help="give up after N failed connects (exit 7; default: retry for ever)",
    )
    a("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, help="gRPC limit")
    a(
        "--log-level",
        default=env.log_level or "info",
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        help="debug, info, warning, error",
    )


def service_config(args: argparse.Namespace, env: Env) -> ServiceConfig:
    tls = cache_tls = None
    if args.ca_cert or args.client_cert:
        tls = TlsFiles(args.ca_cert, args.client_cert, args.client_key, args.tls_server_name)
    if args.cache_ca_cert:
        cache_tls = TlsFiles(
            args.cache_ca_cert, args.client_cert, args.client_key, args.tls_server_name
        )
    return ServiceConfig(
        queue_address=args.queue,
        cache_address=args.cache,
        api_key=args.api_key or env.api_key,
        proto_package=args.proto_package,
        tls=tls,
        cache_tls=cache_tls,
        max_message_bytes=args.max_message_bytes,
    )


def warn_plaintext_cache(services: ServiceConfig) -> None:
    """At startup: TLS to the queue manager but plaintext to a node cache that is
    not on this host sends the API key over the network in cleartext; say so."""
    if services.tls is None or services.cache_tls is not None:
        return
    if is_loopback(services.cache_address):
        return
    log.warning(
        "TLS to the queue manager, but plaintext to the node cache at %s: the API key "
        "goes to it in cleartext; give --cache-ca-cert (METALCORE_CACHE_CA_CERT) to use TLS",
        services.cache_address,
    )


def is_loopback(address: str) -> bool:
    """Whether a gRPC target (``HOST:PORT``, ``[V6]:PORT``, ``dns:///...``,
    ``unix:...``) stays on this host. Names other than ``localhost`` are not
    resolved: they count as remote."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition("/")[2]
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def worker_identity(args: argparse.Namespace) -> WorkerIdentity:
    """Flags (or METALCORE_WORKER_NODE/POD) where given, host-based defaults otherwise."""
    return WorkerIdentity(**{k: v for k, v in (("node", args.node), ("pod", args.pod)) if v})
