"""The local ALPCRUN.CH services in their own process, with their counters on request.

``python -m ray_alpcrun.devserver`` cannot report ``LocalServices.stats()`` to another
process; the benchmark needs them (``get_shared_data_calls``), so it runs this instead:

    python benchmarks/devserver_stats.py --api-key KEY [--max-message-bytes N]

It prints one JSON line with the addresses, then answers every line read on stdin
with one JSON line of ``stats()`` plus ``worker_nodes``: the node names the
registered workers gave (``{node: workers}``), which ``stats()`` does not report;
it stops at end of input (or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from typing import Any

from ray_alpcrun.config import DevServerConfig
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.transport import DEFAULT_MAX_MESSAGE_BYTES


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
        print(json.dumps(ready), flush=True)
        for _ in sys.stdin:
            print(json.dumps(stats(svc), default=str), flush=True)
    return 0


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
