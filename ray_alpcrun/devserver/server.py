"""``LocalServices``: the queue manager, the central cache and a node cache in
one asyncio process, for tests, examples, notebooks and the CLI.

Example::

    from ray_alpcrun.devserver import LocalServices, DevServerConfig

    with LocalServices(DevServerConfig(queue_port=0, central_cache_port=0,
                                       node_cache_port=0)) as svc:
        ...  # connect to svc.queue_address with svc.api_key
        svc.join(session_id, timeout_s=30)

``with`` runs the services on their own event loop in a background thread;
``async with`` runs them on the current loop. A restart (``restart`` /
``arestart``) keeps the ports and the cache contents but, like restarting a
real queue manager, forgets every session and worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio

from ray_alpcrun import errors
from ray_alpcrun.config import DevServerConfig, ServiceConfig
from ray_alpcrun.devserver.auth import ApiKeyInterceptor
from ray_alpcrun.devserver.cache import CentralCacheServicer, NodeCacheServicer, SharedDataStore
from ray_alpcrun.devserver.core import QueueCore
from ray_alpcrun.devserver.errors import Rejected
from ray_alpcrun.devserver.ports import check_free
from ray_alpcrun.devserver.queue import QueueServicer
from ray_alpcrun.loop_thread import LoopThread
from ray_alpcrun.transport import (
    Stub,
    TlsFiles,
    make_metadata,
    open_channel,
    server_options,
    service_handler,
)

log = logging.getLogger("ray_alpcrun.devserver")

T = TypeVar("T")

_ANY_HOST = ("", "0.0.0.0", "::", "[::]")


class LocalServices:
    """Queue manager + central cache + node cache on three ports of one process.

    ``config=None`` means defaults with every port 0 (free ports). ``clock``
    returns monotonic seconds (default ``time.monotonic``); tests inject a fake
    one and call ``tick()`` after moving it.
    """

    def __init__(
        self,
        config: DevServerConfig | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config or DevServerConfig(
            queue_port=0, central_cache_port=0, node_cache_port=0
        )
        self.clock = clock or time.monotonic
        self.api_key: str = self.config.api_key or secrets.token_hex(32)
        self.api_key_generated = self.config.api_key is None
        self.proto_package = self.config.proto_package
        self.central_store = SharedDataStore(self.clock)
        self.node_store = SharedDataStore(self.clock)
        self._ports = {
            "queue": self.config.queue_port,
            "central": self.config.central_cache_port,
            "node": self.config.node_cache_port,
        }
        self._core: QueueCore | None = None
        self._central: CentralCacheServicer | None = None
        self._node: NodeCacheServicer | None = None
        self._servers: list[grpc.aio.Server] = []
        self._channel: grpc.aio.Channel | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: LoopThread | None = None  # set by start(): the sync life cycle

    # --- addresses ---------------------------------------------------------

    def _address(self, which: str) -> str:
        host = self.config.host
        host = "127.0.0.1" if host in _ANY_HOST else host
        return f"{host}:{self._ports[which]}"

    @property
    def queue_address(self) -> str:
        return self._address("queue")

    @property
    def central_cache_address(self) -> str:
        return self._address("central")

    @property
    def node_cache_address(self) -> str:
        return self._address("node")

    @property
    def core(self) -> QueueCore:
        if self._core is None:
            raise RuntimeError("the services are not running")
        return self._core

    def client_tls(self, service: str = "queue") -> TlsFiles | None:
        """TLS settings a client on this machine can use for ``service`` (queue,
        central, node): None where it listens in plaintext; else trusts ``tls_ca``
        (else the server certificate itself) and, where client certificates are
        required, presents the server's own pair."""
        tls = self.config.tls
        if tls is None or service in self.config.plaintext_services:
            return None
        trust = self.config.tls_ca or tls.cert
        if tls.ca_cert is None:
            return TlsFiles(ca_cert=trust, server_name=tls.server_name)
        return TlsFiles(ca_cert=trust, cert=tls.cert, key=tls.key, server_name=tls.server_name)

    def service_config(self) -> ServiceConfig:
        """How a client or worker reaches these services (node cache as its cache)."""
        return ServiceConfig(
            queue_address=self.queue_address,
            cache_address=self.node_cache_address,
            central_cache_address=self.central_cache_address,
            api_key=self.api_key,
            proto_package=self.proto_package,
            tls=self.client_tls("queue"),
            cache_tls=self.client_tls("node"),
            max_message_bytes=self.config.max_message_bytes,
        )

    # --- async life cycle --------------------------------------------------

    def _server(self) -> grpc.aio.Server:
        options = [*server_options(self.config.max_message_bytes), ("grpc.so_reuseport", 0)]
        return grpc.aio.server(interceptors=[ApiKeyInterceptor(self.api_key)], options=options)

    def _listen(self, server: grpc.aio.Server, which: str) -> None:
        address = f"{self.config.host}:{self._ports[which]}"
        try:
            if self.config.tls is not None and which not in self.config.plaintext_services:
                port = server.add_secure_port(address, self.config.tls.server_credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:  # taken since check_free, or at a restart (gRPC said so too)
            raise errors.ConfigError(f"cannot listen on {address}: {exc}") from exc
        if port == 0:
            raise errors.ConfigError(f"cannot listen on {address} (in use?)")
        self._ports[which] = port

    async def astart(self) -> None:
        """Start the three services on the running event loop."""
        if self._servers:
            raise RuntimeError("already running")
        # Every port before gRPC binds any: its failed bind prints a plain line.
        for port in self._ports.values():
            check_free(self.config.host, port)
        self._loop = asyncio.get_running_loop()
        pkg = self.proto_package
        try:
            central = self._server()
            self._central = CentralCacheServicer(self.central_store)
            central.add_generic_rpc_handlers((service_handler("Cache", self._central, pkg),))
            self._listen(central, "central")
            self._servers.append(central)
            await central.start()

            self._channel = open_channel(
                self.central_cache_address,
                self.client_tls("central"),
                self.config.max_message_bytes,
            )
            node = self._server()
            self._node = NodeCacheServicer(
                self.node_store, Stub(self._channel, "Cache", pkg), make_metadata(self.api_key)
            )
            node.add_generic_rpc_handlers((service_handler("Cache", self._node, pkg),))
            self._listen(node, "node")
            self._servers.append(node)
            await node.start()

            await self._start_queue()
        except BaseException:
            await self.astop()
            raise
        self._ticker = asyncio.create_task(self._tick_forever())
        log.info(
            "dev services up: queue %s, central cache %s, node cache %s, proto package %r",
            self.queue_address,
            self.central_cache_address,
            self.node_cache_address,
            self.proto_package,
        )

    async def _start_queue(self) -> None:
        self._core = QueueCore(self.config, self.clock)
        queue = self._server()
        queue.add_generic_rpc_handlers(
            (service_handler("Queue", QueueServicer(self._core), self.proto_package),)
        )
        self._listen(queue, "queue")
        self._servers.insert(0, queue)
        await queue.start()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_s)  # ok: timer resolution, not a wait
            self._tick_now()

    def _tick_now(self) -> None:
        if self._core is not None:
            self._core.tick()
        self.central_store.purge()
        self.node_store.purge()

    async def astop(self, grace_s: float = 0.2) -> None:
        """Stop every service (open streams are cancelled after ``grace_s``)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        servers, self._servers = self._servers, []
        for server in servers:
            await server.stop(grace_s)
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    async def arestart(self, grace_s: float = 0.0) -> None:
        """Restart the queue manager on the same port, forgetting sessions and workers."""
        if not self._servers:
            raise RuntimeError("the services are not running")
        queue = self._servers.pop(0)
        await queue.stop(grace_s)
        await self._start_queue()
        log.info("queue manager restarted on %s", self.queue_address)

    async def __aenter__(self) -> LocalServices:
        await self.astart()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    # --- sync life cycle (own loop in a background thread) -----------------

    def _run(self, coro: Coroutine[object, None, T], timeout_s: float | None = None) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("the services are not running")
        if self._in_loop_thread():
            coro.close()
            raise RuntimeError("called from the services' own event loop: use the a* method")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    def _in_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def start(self) -> None:
        """Start the services on their own event loop in a background thread."""
        if self._thread is not None:
            raise RuntimeError("already running")
        self._thread = thread = LoopThread("alpcrun-devserver", "LocalServices")
        try:
            thread.run(self.astart())
        except BaseException:
            self._shutdown_thread()
            raise

    def stop(self) -> None:
        """Stop services started with ``start()``."""
        if self._thread is None:
            return
        try:
            self._run(self.astop())
        finally:
            self._shutdown_thread()

    def _shutdown_thread(self) -> None:
        thread = self._thread
        if thread is None:
            return
        thread.stop()
        self._loop, self._thread = None, None

    def restart(self) -> None:
        """Sync twin of ``arestart``."""
        self._run(self.arestart())

    def __enter__(self) -> LocalServices:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- waiting and inspection --------------------------------------------

    async def ajoin(self, session_id: str, timeout_s: float = 30.0) -> None:
        """Wait until every task submitted to the session was answered (result or
        dead letter) and its results were handed to a client stream.

        Raises TimeoutError, ``errors.NotFoundError`` for an unknown session, or
        ``SessionClosed`` when it was closed with tasks unanswered."""
        core = self.core
        try:
            await asyncio.wait_for(core.wait_drained(session_id), timeout_s)
        except Rejected as r:
            raise errors.NotFoundError(r.code, r.details) from r
        except asyncio.TimeoutError:
            s = core.sessions.get(session_id)
            detail = (
                f"{s.unanswered_tasks} task(s) unanswered: {s.tasks.tasks} queued, "
                f"{s.inflight_batches} batch(es) in flight, {len(s.results)} result batch(es) "
                f"waiting for a client stream, {len(s.bound)} worker(s) bound"
                if s is not None
                else "session gone"
            )
            raise TimeoutError(
                f"session {session_id} not drained after {timeout_s} s: {detail}"
            ) from None

    def join(self, session_id: str, timeout_s: float = 30.0) -> None:
        """Sync twin of ``ajoin`` (for services started with ``with`` / ``start()``)."""
        self._run(self.ajoin(session_id, timeout_s))

    async def atick(self) -> None:
        """Check timers now (idle reaping, rebalancing, TTLs), e.g. after moving a fake clock."""
        self._tick_now()

    def tick(self) -> None:
        """Sync twin of ``atick``."""
        if self._in_loop_thread() or self._thread is None:
            self._tick_now()
        else:
            self._run(self.atick())

    # --- fault injection (chaos tests) --------------------------------------

    async def aabort(self, kind: str, count: int = 1, seed: int = 0) -> int:
        """End ``count`` worker calls with UNAVAILABLE, as a queue manager that drops
        them, chosen by ``seed`` among those open: ``kind`` ``"stream"`` (a
        ``WorkerStream``: its batches in flight are re-queued) or ``"registration"``
        (a ``WorkerUpdate``: the worker is unregistered). Returns how many ended."""
        return self._abort_now(kind, count, seed)

    def abort(self, kind: str, count: int = 1, seed: int = 0) -> int:
        """Sync twin of ``aabort``."""
        return self._run(self.aabort(kind, count, seed))

    def _abort_now(self, kind: str, count: int, seed: int) -> int:
        binding = self.core.binding
        rng = random.Random(seed)
        if kind == "stream":
            sessions = [*self.core.table.open.values(), *self.core.table.closing.values()]
            conns = [c for s in sessions for c in s.streams if not c.closed and c.failure is None]
            for conn in rng.sample(conns, min(count, len(conns))):
                binding.abort_stream(conn, "stream aborted by the queue manager (fault injected)")
            return min(count, len(conns))
        if kind == "registration":
            workers = [w for w in binding.workers.by_id.values() if w.failure is None]
            for w in rng.sample(workers, min(count, len(workers))):
                binding.abort_registration(w, "registration aborted (fault injected)")
            return min(count, len(workers))
        raise ValueError(f"unknown kind {kind!r}: stream or registration")

    async def astats(self) -> dict[str, Any]:
        return self._stats_now()

    def _stats_now(self) -> dict[str, Any]:
        core = self.core
        q = core.stats
        out: dict[str, Any] = {k: v for k, v in vars(q).items() if isinstance(v, int)}
        out["max_inflight_seen_per_worker"] = dict(q.max_inflight_seen_per_worker)
        out["workers"] = len(core.workers.by_id)
        out["sessions"] = len(core.sessions)
        out["get_shared_data_calls"] = self._node.get_calls if self._node else 0
        out["node_central_fetches"] = self._node.central_fetches if self._node else 0
        out["central_get_calls"] = self._central.get_calls if self._central else 0
        out["central_set_calls"] = self._central.set_calls if self._central else 0
        return out

    def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks (see ``DEVSERVER_READY`` notes)."""
        if self._in_loop_thread() or self._thread is None:
            return self._stats_now()
        return self._run(self.astats())
