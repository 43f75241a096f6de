"""Python client of ALPCRUN.CH: sessions, shared data, streaming submission, dead letters.

No Ray here. :class:`AsyncClient` is the implementation; :class:`Client` runs it
on a private event loop in a background thread, so it also works in Jupyter.

Example::

    from ray_alpcrun.client import Client

    with Client(queue="127.0.0.1:1337", central_cache="127.0.0.1:2337") as client:
        with client.create_session(app_id="demo", priority=5) as session:
            session.set_shared_data(b"table", ttl_s=600.0)
            for r in session.submit(payloads, batch_size=100, progress=True):
                print(r.index, r.value() if r.ok else r.error)
"""

from __future__ import annotations

from ray_alpcrun.client.aio import AsyncClient
from ray_alpcrun.client.results import TaskResult
from ray_alpcrun.client.session import AsyncSession
from ray_alpcrun.client.sync import Client, Session
from ray_alpcrun.errors import SubmitTimeout, TaskFailed

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "Session",
    "SubmitTimeout",
    "TaskFailed",
    "TaskResult",
]
