"""The bridge's HTTP endpoint for probes and scraping: ``/healthz``, ``/readyz``,
``/metrics`` (Prometheus text) and ``/status`` (JSON).

Served by aiohttp (installed with ``ray[default]``) on the bridge's event loop:
its HTTP parser, not ours, meets garbage request lines, slow clients and huge
headers. No Ray here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[tuple[bool, str]]]
Render = Callable[[], Awaitable[str]]
Status = Callable[[], Awaitable[dict[str, Any]]]

# The Prometheus text format's content type (prometheus_client.CONTENT_TYPE_LATEST).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# An idle kept-alive connection is closed after this time.
KEEPALIVE_S = 5.0
# Probes need none of this; a bigger request line, header or header count is
# answered 400 (a slow client only holds its own connection: each is a task).
MAX_LINE_BYTES = 8190
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 64


class HealthServer:
    """Serves the probes; each callback is awaited per request.

    Example::

        server = HealthServer(live, ready, metrics, status, host="127.0.0.1", port=0)
        port = await server.start()
        ...
        await server.stop()
    """

    def __init__(
        self,
        live: Check,
        ready: Check,
        metrics: Render,
        status: Status,
        host: str = "0.0.0.0",
        port: int = 8081,
    ) -> None:
        self.host = host
        self.port = port
        self._live, self._ready, self._metrics, self._status = live, ready, metrics, status
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._render_metrics)
        app.router.add_get("/status", self._render_status)
        return app

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0). Raises ``OSError``
        when the address is taken."""
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_FIELD_BYTES,
            max_headers=MAX_HEADERS,
            keepalive_timeout=KEEPALIVE_S,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("health endpoint on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return await self._probe(self._live)

    async def _readyz(self, _: web.Request) -> web.Response:
        return await self._probe(self._ready)

    @staticmethod
    async def _probe(check: Check) -> web.Response:
        try:
            ok, why = await check()
        except Exception as exc:
            ok, why = False, f"check failed: {exc}"
        return web.Response(status=200 if ok else 503, text=f"{'ok' if ok else 'not ok'}: {why}\n")

    async def _render_metrics(self, _: web.Request) -> web.Response:
        body = (await self._metrics()).encode()
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _render_status(self, _: web.Request) -> web.Response:
        text = json.dumps(await self._status(), default=str) + "\n"
        return web.Response(text=text, content_type="application/json")
