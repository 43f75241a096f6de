"""The direct data path: sub-batches reach pool actors on the bridge's node over a
Unix socket, without Ray's per-call machinery.

An ordinary Ray actor call costs the bridge ~0.6 ms of CPU (submission, Ray's
io threads, the reply) and a thread wake-up in each process. Here each
pool actor serves a Unix socket from a thread that sleeps in ``recv``: a call
is one pickled frame each way (tens of microseconds) and costs nothing idle.

Design:

* **Same node only, one peer.** :meth:`PoolActor.open_direct` opens a socket
  only for a bridge on its own node and answers its path and the actor's pid; a
  bridge on another node (or one that cannot connect) keeps ordinary calls for
  that actor. The socket is owner-only (``0600``, in a ``0700`` directory), and
  since a frame is unpickled, it serves exactly one connection: the bridge's,
  told by the kernel's peer credentials on both ends (the actor refuses any
  other pid unread, the bridge sends nothing to a socket the actor does not
  serve); then the actor closes the listener and removes the file. Both ends
  are in :mod:`.sockets`.
* **One connection per actor, in order.** Frames are ``4-byte length +
  pickle``; the actor answers them one at a time, in order, under the same lock
  as ordinary calls (:mod:`.pool_actor`). Sub-batches that queue behind the call
  in flight travel together (:mod:`.coalesce`), as on the ordinary path.
* **Shared data by name.** ``ObjectRef`` s cannot cross a plain socket, so a
  request carries the session and level only; an actor that has not decoded that
  level answers ``None`` for the part and the bridge sends it again as an
  ordinary call that carries the reference (the actor then keeps it).
* **Failure.** An actor that dies closes its end: every part waiting on the
  connection raises :class:`ConnectionError`, which the backend maps to
  :class:`~ray_alpcrun.errors.ActorLost`, so the dispatcher retries on live
  actors and replaces the actor, exactly as for ordinary calls. A hung actor is
  killed by the dispatcher's timeout, which closes the connection the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

from ray_alpcrun.logs import log_task_failure
from ray_alpcrun.pool.backend import as_shared_ref
from ray_alpcrun.pool.coalesce import Coalescer
from ray_alpcrun.pool.membership import CallResult
from ray_alpcrun.pool.pool_actor import ActorInfo, PoolActorHandle, RunArgs, RunReply
from ray_alpcrun.pool.sockets import HEADER as _HEADER
from ray_alpcrun.pool.sockets import connect

if TYPE_CHECKING:
    from ray_alpcrun.pool.backend import RayBackend

log = logging.getLogger(__name__)

# A part's reply: the actor's RunReply, or None when it lacks the part's shared data.
DirectReply = RunReply | None


class _Connection:
    """One actor's socket: frames out in order, replies matched in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._waiting: deque[asyncio.Future[list[DirectReply]]] = deque()
        self._receiver = asyncio.ensure_future(self._receive())
        self._receiver.add_done_callback(log_task_failure)  # a frame it could not read

    async def send(self, parts: list[RunArgs]) -> list[DirectReply]:
        if self._receiver.done():
            raise ConnectionError("the actor's socket is closed")
        frame = pickle.dumps(parts, pickle.HIGHEST_PROTOCOL)
        reply: asyncio.Future[list[DirectReply]] = asyncio.get_running_loop().create_future()
        self._waiting.append(reply)
        self._writer.write(_HEADER.pack(len(frame)) + frame)
        return await reply

    async def _receive(self) -> None:
        reason = "closed"
        try:
            while True:
                (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
                replies = pickle.loads(await self._reader.readexactly(size))
                waiting = self._waiting.popleft()
                if not waiting.done():
                    waiting.set_result(replies)
        except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
            reason = f"the actor's socket closed: {exc!r}"
        finally:
            while self._waiting:
                waiting = self._waiting.popleft()
                if not waiting.done():
                    waiting.set_exception(ConnectionError(reason))

    def close(self) -> None:
        self._writer.close()
        self._receiver.cancel()


class DirectBackend:
    """A :class:`~ray_alpcrun.pool.membership.Backend` that sends sub-batches over
    each same-node actor's socket; ``calls`` (the ordinary backend) starts, kills
    and queries actors, and carries what the socket cannot."""

    def __init__(self, calls: RayBackend) -> None:
        import ray

        self._ray = ray
        self._inner = calls
        self._lost: tuple[type[BaseException], ...] = (*calls.lost_errors, ConnectionError)
        self._connections: dict[int, _Connection] = {}
        self._parts: Coalescer[PoolActorHandle, RunArgs, DirectReply] = Coalescer(
            self._send_one, self._send_many, max_outstanding=1, worth_a_call=calls.worth_a_call
        )

    @property
    def handles(self) -> dict[int, PoolActorHandle]:
        return self._inner.handles

    @property
    def node_of(self) -> dict[int, str]:
        return self._inner.node_of

    @property
    def sends(self) -> int:
        """Socket frames sent so far (each may carry several sub-batches)."""
        return self._parts.calls

    def direct(self, actor: PoolActorHandle) -> bool:
        """Whether sub-batches for ``actor`` go over its socket."""
        return id(actor) in self._connections

    async def start_actor(self) -> PoolActorHandle:
        actor = await self._inner.start_actor()
        try:
            await self.attach(actor)
        except asyncio.CancelledError:
            self._inner.kill(actor)  # released while it started: it must not linger
            raise
        return actor

    async def attach(self, actor: PoolActorHandle) -> bool:
        """Reach ``actor`` over its socket when it is on this node (True), else keep
        ordinary calls for it (False). A node bridge attaches the actors that the
        coordinator created; each attach opens a new socket on the actor."""
        unreachable: tuple[type[BaseException], ...] = (OSError, *self._inner.lost_errors)
        try:
            node = self._ray.get_runtime_context().get_node_id()
            offer = await actor.open_direct.remote(node, os.getpid())
            if offer is None:
                return False  # on another node: ordinary calls
            reader, writer = await connect(*offer)
        except unreachable as exc:
            log.warning("pool actor serves ordinary calls only: %s", exc)
            return False
        self._connections[id(actor)] = _Connection(reader, writer)
        return True

    def detach(self, actor: PoolActorHandle) -> None:
        """Stop reaching ``actor`` (its owner keeps it): close its socket, drop its calls."""
        self._disconnect(actor)
        self._inner.detach(actor)

    async def call(
        self,
        actor: PoolActorHandle,
        session_id: str,
        payloads: list[bytes],
        shared: object,
        tags: tuple[str, ...],
    ) -> CallResult:
        key = id(actor)
        if key not in self._connections:
            return await self._inner.call(actor, session_id, payloads, shared, tags)
        ref = as_shared_ref(shared)
        named = replace(ref, ref=None) if ref is not None else None

        async def sending() -> RunReply:
            reply = await self._parts.call(actor, key, (session_id, payloads, named, tags))
            if reply is None:  # the actor lacks this shared data: once with the reference
                reply = await self._inner.run_one(actor, (session_id, payloads, ref, tags))
            return reply

        return await self._inner.reply_of(sending(), len(payloads), self._lost)

    async def _send_one(self, actor: PoolActorHandle, part: RunArgs) -> DirectReply:
        return (await self._send_many(actor, [part]))[0]

    async def _send_many(self, actor: PoolActorHandle, parts: list[RunArgs]) -> list[DirectReply]:
        connection = self._connections.get(id(actor))
        if connection is None:
            raise ConnectionError("the actor's socket is closed")
        replies = await connection.send(parts)
        if len(replies) != len(parts):
            raise ConnectionError(f"{len(replies)} replies for {len(parts)} sub-batches")
        return replies

    def _disconnect(self, actor: PoolActorHandle) -> None:
        connection = self._connections.pop(id(actor), None)
        if connection is not None:
            connection.close()
        self._parts.forget(id(actor))

    def kill(self, actor: PoolActorHandle) -> None:
        self._disconnect(actor)
        self._inner.kill(actor)

    def same_process(self, actor: PoolActorHandle, info: ActorInfo) -> bool:
        return self._inner.same_process(actor, info)

    def recycle(self, actor: PoolActorHandle) -> None:
        self._disconnect(actor)  # its next incarnation opens a new socket as it starts
        self._inner.recycle(actor)

    async def end_session(self, actor: PoolActorHandle, session_id: str) -> None:
        await self._inner.end_session(actor, session_id)

    async def retire(self, actor: PoolActorHandle) -> None:
        self._disconnect(actor)
        await self._inner.retire(actor)

    async def status(self, actor: PoolActorHandle, timeout_s: float) -> ActorInfo:
        info = await self._inner.status(actor, timeout_s)
        info["data_path"] = "direct" if self.direct(actor) else "calls"
        return info

    async def close(self) -> None:
        for key in list(self._connections):
            self._connections.pop(key).close()
        await self._parts.close()
        await self._inner.close()
