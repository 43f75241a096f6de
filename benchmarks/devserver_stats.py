"""The local ALPCRUN.CH services in their own process, with their counters on request.

``python -m ray_alpcrun.devserver`` cannot report ``LocalServices.stats()`` to another
process; the benchmark needs them (``get_shared_data_calls``), so it runs this instead:

    python benchmarks/devserver_stats.py --api-key KEY [--max-message-bytes N]

It prints one JSON line with the addresses, then answers every line read on stdin
with one JSON line of ``stats()``; it stops at end of input (or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import sys

from ray_alpcrun.config import DevServerConfig
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.transport import DEFAULT_MAX_MESSAGE_BYTES


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--api-key", required=True)
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    args = p.parse_args()
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
            print(json.dumps(svc.stats(), default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
