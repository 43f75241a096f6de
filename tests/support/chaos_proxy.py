"""A TCP proxy for fault injection: put it between the bridge and a service,
then ``cut()`` every connection (streams break mid-batch, as when a network
link drops) or take it ``down()`` (connections refused until ``up()``).

Runs its own event loop in a background thread, so sync tests can use it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class TcpProxy:
    """``TcpProxy("127.0.0.1:PORT")``; ``address`` is where to connect instead."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._down = False
        self.accepted = 0
        self.refused = 0
        self.cuts = 0
        self.refused_event = threading.Event()
        self.address = ""

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            self.refused += 1
            self.refused_event.set()
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()  # a reset, not a clean close: what a dropped link looks like
        self._writers.clear()

    def cut(self) -> None:
        """Break every open connection now (new ones are accepted)."""
        self.cuts += 1
        self._run(self._cut())

    def down(self) -> None:
        """Break every connection and refuse new ones until ``up()``."""
        self._down = True
        self.refused_event.clear()
        self.cut()

    def up(self) -> None:
        self._down = False
