"""The bridge's check of the API key and TLS trust before it serves: a read of
an empty session id from the node cache, which changes nothing. The queue
manager is judged by the registration itself, never by a call with side
effects. Only authentication and TLS failures count here;
unreachable services are left to the worker's retries. Never imports Ray.

The CLI runs it before starting Ray (:func:`preflight`, on a channel of its
own), so that a wrong key exits 4 in a second; the bridge actor runs it again
on its own channels (:func:`check_node_cache`), for bridges started from Python.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import grpc.aio

from ray_alpcrun import errors, transport
from ray_alpcrun.bridge.settings import WorkerSettings, fatal_for
from ray_alpcrun.rpc import CacheStub
from ray_alpcrun.transport import MD_NODE, Metadata
from ray_alpcrun.types import SharedData

log = logging.getLogger("ray_alpcrun.bridge.worker")

_WHAT = "node cache"


async def probe_node_cache(
    cache: CacheStub, metadata: Metadata, settings: WorkerSettings, *, timeout_s: float
) -> str | None:
    """Why the node cache cannot be reached now (``UNAVAILABLE``: nothing listens,
    refused, unknown host; or no answer within ``timeout_s``), or None when it
    answers at all (a read of the empty session id; any answer proves the address).
    Raises the FatalError a refused key or TLS trust means."""
    call = cache.GetSharedData(SharedData(""), metadata=metadata)
    try:
        await asyncio.wait_for(call, timeout_s)
    except grpc.aio.AioRpcError as exc:
        fatal = fatal_for(transport.translate(exc), settings, _WHAT)
        if fatal is not None and fatal.exit_code in (errors.EXIT_AUTH, errors.EXIT_TLS):
            raise fatal from exc
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            detail = (exc.details() or exc.code().name).splitlines()[0]
            return f"{exc.code().name}: {detail}"
    except asyncio.TimeoutError:
        return f"no answer within {timeout_s:g} s"
    return None


async def check_node_cache(
    cache: CacheStub,
    metadata: Metadata,
    settings: WorkerSettings,
    *,
    timeout_s: float,
    quiet: bool = False,
) -> None:
    """Raise the FatalError (exit 4 or 5) a refused read means; a cache that
    cannot be reached is logged (unless ``quiet``) and passes (the worker waits
    for it: :meth:`~ray_alpcrun.bridge.worker.BridgeWorker.wait_for_cache`)."""
    why = await probe_node_cache(cache, metadata, settings, timeout_s=timeout_s)
    if why is not None and not quiet:
        log.warning("%s not answering yet (%s); will keep trying", _WHAT, why)


async def preflight(settings: WorkerSettings, timeout_s: float = 3.0) -> None:
    """:func:`check_node_cache` on a channel of its own, closed before it returns."""
    channel = transport.open_channel(
        settings.cache_address, settings.cache_tls, settings.max_message_bytes
    )
    try:
        metadata = transport.make_metadata(settings.api_key, **{MD_NODE: settings.node})
        stub = CacheStub(channel, settings.proto_package)
        await check_node_cache(stub, metadata, settings, timeout_s=timeout_s, quiet=True)
    finally:
        await channel.close(None)
