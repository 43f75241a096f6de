"""A tiny HTTP endpoint for probes and scraping: ``/healthz``, ``/readyz``,
``/metrics`` (Prometheus text) and ``/status`` (JSON).

Plain asyncio, no framework and no Ray: it runs on the bridge's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[tuple[bool, str]]]
Render = Callable[[], Awaitable[str]]
Status = Callable[[], Awaitable[dict[str, Any]]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_READ_TIMEOUT_S = 5.0


class HealthServer:
    """Serves the probes; each callback is awaited per request."""

    def __init__(
        self,
        live: Check,
        ready: Check,
        metrics: Render,
        status: Status,
        host: str = "0.0.0.0",
        port: int = 8081,
    ) -> None:
        self._routes: dict[str, Callable[[], Awaitable[tuple[int, str, str]]]] = {
            "/healthz": lambda: self._probe(live),
            "/readyz": lambda: self._probe(ready),
            "/metrics": lambda: self._text(metrics, "text/plain; version=0.0.4"),
            "/status": lambda: self._json(status),
        }
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health endpoint on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), _READ_TIMEOUT_S)
            while (await asyncio.wait_for(reader.readline(), _READ_TIMEOUT_S)) not in (
                b"\r\n",
                b"",
            ):
                pass  # headers are not needed
            parts = request.decode("latin-1").split()
            if len(parts) < 2:
                return
            method, path = parts[0], parts[1].split("?", 1)[0]
            route = self._routes.get(path)
            if method not in ("GET", "HEAD"):
                code, ctype, body = 405, "text/plain", "GET only\n"
            elif route is None:
                code, ctype, body = 404, "text/plain", "not found\n"
            else:
                code, ctype, body = await route()
            data = body.encode()
            head = (
                f"HTTP/1.1 {code} {_REASONS.get(code, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if method == "HEAD" else data))
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _probe(check: Check) -> tuple[int, str, str]:
        try:
            ok, why = await check()
        except Exception as exc:
            ok, why = False, f"check failed: {exc}"
        return (200 if ok else 503), "text/plain", f"{'ok' if ok else 'not ok'}: {why}\n"

    @staticmethod
    async def _text(render: Render, ctype: str) -> tuple[int, str, str]:
        return 200, ctype, await render()

    @staticmethod
    async def _json(status: Status) -> tuple[int, str, str]:
        return 200, "application/json", json.dumps(await status(), default=str) + "\n"
