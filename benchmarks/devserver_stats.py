"""The local ALPCRUN.CH services in their own process, with their counters on request.

``python -m ray_alpcrun.devserver`` cannot report ``LocalServices.stats()`` to another
process; the benchmark needs them (``get_shared_data_calls``), so it runs this instead:

    python benchmarks/devserver_stats.py --api-key KEY [--max-message-bytes N]

It prints one JSON line with the addresses, then answers every line read on stdin
with one JSON line of ``stats()`` plus ``worker_nodes``: the node names the
registered workers gave (``{node: workers}``), which ``stats()`` does not report;
it stops at end of input (or SIGTERM).

Two more lines are understood (the chaos run, ``benchmarks/chaos_cluster.py``, uses
them; the services themselves keep no history):

* ``answered_after T``: ``{node: wall time}`` of the first result batch each node's
  workers answered after wall time ``T`` (``time.time()``), for the nodes that
  answered one since; the last ``HISTORY`` answers of each node are kept;
* ``events``: what happened to the logical workers since the last ``events`` line,
  ``[[wall time, kind, node, detail], ...]``: ``registered``, ``unregistered`` and
  ``requeued`` (a worker stream ended with ``detail`` batches in flight, which go
  back to the queue: the deliveries that a fault, or the bridge, cost).
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from typing import Any

from ray_alpcrun.config import DevServerConfig
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.transport import DEFAULT_MAX_MESSAGE_BYTES

HISTORY = 20_000
MAX_EVENTS = 100_000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--api-key", required=True)
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    args = p.parse_args()
    level = os.environ.get("METALCORE_LOG_LEVEL", "warning").upper()
    logging.basicConfig(level=level, format="devserver %(levelname)s %(name)s: %(message)s")
    config = DevServerConfig(
        queue_port=0,
        central_cache_port=0,
        node_cache_port=0,
        api_key=args.api_key,
        max_message_bytes=args.max_message_bytes,
    )
    with LocalServices(config) as svc:
        ready = {
            "queue": svc.queue_address,
            "central_cache": svc.central_cache_address,
            "node_cache": svc.node_cache_address,
        }
        history = History(svc)
        print(json.dumps(ready), flush=True)
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["answered_after"]:
                out: Any = history.answered_after(float(words[1]))
            elif words[:1] == ["events"]:
                out = history.take_events()
            else:
                out = stats(svc)
            print(json.dumps(out, default=str), flush=True)
    return 0


class History:
    """Per node, when its workers answered; and the workers' registrations and
    re-queues. Wraps three methods of the services' worker side (their own
    instances only), which run in the services' loop thread; this process reads
    the records from its main thread (deques and lists: appends are atomic)."""

    def __init__(self, svc: LocalServices) -> None:
        binding = svc.core.binding
        flow = binding.flow
        self._answers: dict[str, deque[float]] = {}
        self._events: deque[list[Any]] = deque(maxlen=MAX_EVENTS)
        on_result, release_stream = flow.on_result, flow.release_stream
        register, unregister = binding.register_worker, binding.unregister_worker

        def on_result_(conn: Any, result: Any) -> None:
            answered = flow.stats.result_batches + flow.stats.dead_lettered_batches
            on_result(conn, result)
            if flow.stats.result_batches + flow.stats.dead_lettered_batches > answered:
                node = conn.worker.node
                self._answers.setdefault(node, deque(maxlen=HISTORY)).append(time.time())

        def release_stream_(conn: Any, requeue: bool) -> None:
            if requeue and conn.inflight:
                now = flow._clock()
                # How long each batch had been in flight there, and its delivery number.
                held = [[round(now - p.sent_at_s, 3), p.deliveries] for p in conn.inflight.values()]
                self._events.append(
                    [time.time(), "requeued", conn.worker.node, len(conn.inflight), held]
                )
            release_stream(conn, requeue)

        def register_(node: str, pod: str) -> Any:
            self._events.append([time.time(), "registered", node, pod])
            return register(node, pod)

        def unregister_(w: Any) -> None:
            if w.id in binding.workers.by_id:
                self._events.append([time.time(), "unregistered", w.node, w.pod])
            unregister(w)

        flow.on_result = on_result_  # type: ignore[method-assign]
        flow.release_stream = release_stream_  # type: ignore[method-assign]
        binding.register_worker = register_  # type: ignore[method-assign]
        binding.unregister_worker = unregister_  # type: ignore[method-assign]

    def answered_after(self, t: float) -> dict[str, float]:
        out = {}
        for node, times in list(self._answers.items()):
            snapshot = list(times)
            i = bisect.bisect_right(snapshot, t)
            if i < len(snapshot):
                out[node] = snapshot[i]
        return out

    def take_events(self) -> list[list[Any]]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out


def stats(svc: LocalServices) -> dict[str, Any]:
    out = svc.stats()
    # The registry lives in the services' loop thread: dict() copies it in one step
    # under the GIL, so it cannot change while it is read; the fields it reads are
    # set once, at registration.
    workers = dict(svc.core.workers.by_id)
    out["worker_nodes"] = dict(Counter(w.node for w in workers.values()))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
