"""The ``Queue`` service over gRPC: translates the seven RPCs into ``QueueCore``
calls and ``Rejected`` into status codes.

Each bidirectional stream has one pump: a reader task (owned by the handler,
cancelled and awaited when the call ends) feeds incoming messages to the core,
and the handler's generator yields what the core hands out.

Metadata: ``WorkerUpdate`` needs ``node`` and ``pod`` (INVALID_ARGUMENT
otherwise) and answers with the ``workerid`` response header before the first
Instruction. ``WorkerStream`` needs ``sessionid`` and either ``workerid`` or
``node`` + ``pod``. ``ClientStream`` accepts ``sessionid`` as the default for
batches without ``session_id``; a result batch whose write failed because the
stream ended goes back to its session, for the next client stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from ray_alpcrun.devserver.core import QueueCore
from ray_alpcrun.devserver.errors import Rejected
from ray_alpcrun.rpc import Context
from ray_alpcrun.transport import MD_NODE, MD_POD, MD_SESSION_ID, MD_WORKER_ID
from ray_alpcrun.types import Batch, Instruction, SessionInfo, Status, WorkerState

log = logging.getLogger("ray_alpcrun.devserver")

T = TypeVar("T")


def metadata(context: Context) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


async def abort(context: Context, rejected: Rejected) -> NoReturn:
    await context.abort(grpc.StatusCode[rejected.code], rejected.details)
    raise AssertionError("unreachable")  # abort always raises


async def checked(context: Context, fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except Rejected as r:
        await abort(context, r)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class QueueServicer:
    """``Queue`` RPCs (an ``rpc.QueueHandler``); register with ``rpc.service_handler``."""

    def __init__(self, core: QueueCore) -> None:
        self.core = core

    async def CreateSession(self, request: SessionInfo, context: Context) -> SessionInfo:
        return await checked(context, self.core.create_session, request)

    async def UpdateSession(self, request: SessionInfo, context: Context) -> Status:
        await checked(context, self.core.update_session, request)
        return Status()

    async def CloseSession(self, request: SessionInfo, context: Context) -> Status:
        await checked(context, self.core.close_session, request.id)
        return Status()

    async def ClientStreamDeadLetters(
        self, request: SessionInfo, context: Context
    ) -> AsyncIterator[Batch]:
        batches = await checked(context, self.core.take_dead_letters, request.id)
        sent = 0
        try:
            for batch in batches:
                yield batch
                sent += 1
        finally:
            if sent < len(batches):
                self.core.return_dead_letters(request.id, batches[sent:])

    async def ClientStream(
        self, requests: AsyncIterator[Batch], context: Context
    ) -> AsyncIterator[Batch]:
        default_sid = metadata(context).get(MD_SESSION_ID, "")
        conn = await checked(context, self.core.open_client, default_sid)

        async def read() -> None:
            try:
                async for batch in requests:
                    self.core.submit(conn, batch, default_sid)
                conn.half_closed = True
            except Exception as exc:  # reported by the handler below
                conn.failure = exc
            conn.wake.set()

        reader = asyncio.create_task(read())
        client_gone = False
        handing: Batch | None = None  # yielded, not yet written to the client
        try:
            while True:
                try:
                    batch = await self.core.next_result(conn)
                except Rejected as r:
                    await abort(context, r)
                if batch is None:
                    return
                handing = batch
                yield batch
                handing = None
        except (asyncio.CancelledError, GeneratorExit):
            client_gone = True
            if handing is not None:  # the stream ended under it (e.g. a refused batch)
                self.core.return_result(handing)
            raise
        finally:
            await _stop(reader)
            # The reader may see the client's cancellation first (as an error on
            # the request stream); the context still tells that the client left.
            self.core.close_client(conn, client_gone or context.cancelled())

    async def WorkerUpdate(
        self, requests: AsyncIterator[WorkerState], context: Context
    ) -> AsyncIterator[Instruction]:
        md = metadata(context)
        node, pod = md.get(MD_NODE, ""), md.get(MD_POD, "")
        if not node or not pod:
            await abort(
                context,
                Rejected("INVALID_ARGUMENT", "WorkerUpdate needs the 'node' and 'pod' metadata"),
            )
        binding = self.core.binding
        worker = binding.register_worker(node, pod)

        async def read() -> None:
            try:
                async for state in requests:
                    binding.worker_state(worker, state)
                binding.worker_reports_closed(worker)
            except Exception as exc:
                worker.outbox.put_nowait(None)
                failures.append(exc)

        failures: list[BaseException] = []
        reader: asyncio.Task[None] | None = None
        broke = False
        try:
            await context.send_initial_metadata(((MD_WORKER_ID, worker.id),))
            reader = asyncio.create_task(read())
            while True:
                instruction = await worker.outbox.get()
                if instruction is None:
                    if isinstance(worker.failure, Rejected):
                        await abort(context, worker.failure)
                    if failures:
                        raise failures[0]
                    return
                yield instruction
        except asyncio.CancelledError:  # the call broke (context.cancelled() is not set yet)
            broke = True
            raise
        finally:
            if reader is not None:
                await _stop(reader)
            if broke or failures:  # before its streams' batches go back (flow: LOST_PEER_S)
                binding.flow.connection_lost(context.peer() or "")
            binding.unregister_worker(worker)

    async def WorkerStream(
        self, requests: AsyncIterator[Batch], context: Context
    ) -> AsyncIterator[Batch]:
        md = metadata(context)
        sid, wid = md.get(MD_SESSION_ID, ""), md.get(MD_WORKER_ID, "")
        node, pod = md.get(MD_NODE, ""), md.get(MD_POD, "")
        if not sid:
            await abort(
                context, Rejected("INVALID_ARGUMENT", "WorkerStream needs the 'sessionid' metadata")
            )
        if not wid and not (node and pod):
            await abort(
                context,
                Rejected(
                    "INVALID_ARGUMENT",
                    "WorkerStream needs the 'node' and 'pod' metadata (or 'workerid')",
                ),
            )
        core = self.core
        conn = await checked(context, core.binding.open_stream, sid, node, pod, wid)
        conn.peer = context.peer() or ""

        async def read() -> None:
            try:
                async for batch in requests:
                    core.flow.on_result(conn, batch)
                conn.peer_done = True
            except Exception as exc:
                conn.failure = exc
            conn.wake.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                try:
                    batch = await core.flow.next_batch(conn)
                except Rejected as r:  # the stream was aborted (binding.abort_stream)
                    await abort(context, r)
                if batch is None:
                    return
                yield batch
        except asyncio.CancelledError:  # the call broke (context.cancelled() is not set yet)
            conn.lost = True
            raise
        finally:
            await _stop(reader)
            conn.lost = conn.lost or conn.failure is not None  # a Rejected one: see _give_back
            core.binding.close_stream(conn)
