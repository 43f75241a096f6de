"""The local services in a process of their own, driven over stdin/stdout.

The chaos run (``tests/support/chaos_cluster.py``) samples the queue manager's
memory apart from the clients and the Ray driver, so the services run here:
``ServicesProcess`` starts ``python -m tests.support.services_process``, which
prints one JSON line with its addresses and then answers one JSON line per
command line::

    {"op": "abort", "kind": "stream"|"registration", "count": 1, "seed": 7} -> {"aborted": 1}
    {"op": "session", "id": SID}   -> {"submitted": N, "unanswered": M} (or {} if gone)
    {"op": "stats"}                -> LocalServices.stats()
    {"op": "where"}                -> {"sessions": per open session: queued tasks, batches in
                                      flight per worker (node, bound, age), workers bound;
                                      "workers": each registered worker} (a stall report)
    {"op": "stop"}                 -> {} and the process exits

Its log goes to stderr (a file, for the caller).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from typing import IO, Any

from ray_alpcrun.config import DevServerConfig


class ServicesProcess:
    """``with ServicesProcess(log_path) as svc:`` -- the addresses and key as
    ``LocalServices`` has them, ``call(op, **args)`` for the commands above."""

    def __init__(self, log_path: str, max_deliveries: int = 3, env: dict[str, str] | None = None):
        self._log_path = log_path
        self._max_deliveries = max_deliveries
        self._env = env
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self.queue_address = self.central_cache_address = self.node_cache_address = ""
        self.api_key = ""
        self.proto_package = ""
        self.pid = 0

    def __enter__(self) -> ServicesProcess:
        self._log = open(self._log_path, "w")  # closed in __exit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.services_process", str(self._max_deliveries)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=self._env,
        )
        hello = self._read()
        self.queue_address = hello["queue"]
        self.central_cache_address = hello["central"]
        self.node_cache_address = hello["node"]
        self.api_key = hello["api_key"]
        self.proto_package = hello["proto_package"]
        self.pid = self.proc.pid
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                self.call("stop")
                proc.wait(timeout=30)
            except Exception:
                proc.kill()
                proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the services process ended; its log: {self._log_path}")
        out: dict[str, Any] = json.loads(line)
        return out

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One command and its answer (thread-safe; blocking)."""
        assert self.proc is not None and self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
            return self._read()


def _serve(max_deliveries: int) -> None:
    from ray_alpcrun.devserver import LocalServices

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    logging.getLogger("ray_alpcrun.devserver").setLevel(logging.DEBUG)
    config = DevServerConfig(
        queue_port=0, central_cache_port=0, node_cache_port=0, max_deliveries=max_deliveries
    )
    with LocalServices(config) as svc:
        out = sys.stdout
        hello = {
            "queue": svc.queue_address,
            "central": svc.central_cache_address,
            "node": svc.node_cache_address,
            "api_key": svc.api_key,
            "proto_package": svc.proto_package,
            "pid": os.getpid(),
        }
        out.write(json.dumps(hello) + "\n")
        out.flush()
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd.pop("op")
            reply: dict[str, Any] = {}
            if op == "abort":
                reply = {"aborted": svc.abort(cmd["kind"], cmd.get("count", 1), cmd.get("seed", 0))}
            elif op == "session":
                reply = svc._run(_session(svc, cmd["id"]))
            elif op == "stats":
                reply = svc.stats()
            elif op == "where":
                reply = svc._run(_where(svc))
            out.write(json.dumps(reply) + "\n")
            out.flush()
            if op == "stop":
                break


async def _session(svc: Any, session_id: str) -> dict[str, Any]:
    table = svc.core.table
    s = table.open.get(session_id) or table.closing.get(session_id)
    if s is None:
        return {}
    return {"submitted": s.submitted_tasks, "unanswered": s.unanswered_tasks}


async def _where(svc: Any) -> dict[str, Any]:
    """Where every open session's unanswered tasks are (what a stalled run prints):
    ``{"sessions": {id: ...}, "workers": {id: ...}}``."""
    core = svc.core
    now = core.clock()
    sessions: dict[str, Any] = {}
    for sid, s in list(core.table.open.items()) + list(core.table.closing.items()):
        streams = []
        for conn in s.streams:
            ages = [round(now - p.sent_at_s, 1) for p in conn.inflight.values()]
            streams.append({
                "worker": conn.worker.id, "node": conn.worker.node, "in_flight": len(ages),
                "oldest_s": max(ages, default=0.0), "draining": conn.draining,
                "closed": conn.closed, "peer_done": conn.peer_done,
            })  # fmt: skip
        sessions[sid] = {
            "app": s.app_id, "unanswered": s.unanswered_tasks, "queued": s.tasks.tasks,
            "live_batches": len(s.live), "inflight_batches": s.inflight_batches,
            "bound": sorted(s.bound), "streams": streams, "closing": s.closing,
        }  # fmt: skip
    workers = {
        w.id: {"node": w.node, "bound": w.bound.id if w.bound else None,
               "status": str(w.status), "streams": sorted(w.streams)}
        for w in core.workers.by_id.values()
    }  # fmt: skip
    return {"sessions": sessions, "workers": workers}


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
