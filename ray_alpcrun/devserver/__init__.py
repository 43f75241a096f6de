"""Local ALPCRUN.CH services: a queue manager (``Queue``, all seven RPCs), a
central cache and a node cache (``Cache``), in one asyncio process.

Use them in-process (``LocalServices``, sync ``with`` or ``async with``, port 0
allowed, ``join()`` waits until a session is drained) or from the command line
(``python -m ray_alpcrun.devserver --help``). The behaviour the docs leave open
is decided and documented in the module docstrings of ``core``, ``flow``,
``sessions``, ``attributes``, ``scheduler`` and ``cache``.
"""

from __future__ import annotations

from ray_alpcrun.config import DevServerConfig
from ray_alpcrun.devserver.errors import Rejected, SessionClosed
from ray_alpcrun.devserver.server import LocalServices

__all__ = ["DevServerConfig", "LocalServices", "Rejected", "SessionClosed"]
