"""Local ALPCRUN.CH services: a queue manager (``Queue``, all seven RPCs), a
central cache and a node cache (``Cache``), in one asyncio process.

Use them in-process (``LocalServices``, sync ``with`` or ``async with``, port 0
allowed, ``join()`` waits until a session is drained) or from the command line
(``python -m ray_alpcrun.devserver --help``).

Where the docs (ALPCRUN_PROTOCOL.md, the upstream guide) speak, the devserver
does what they say: results are matched by ``related_id`` (also in a result
batch without an ``id``), only ``preemptible`` sessions give workers up, and
CloseSession empties the queues only with ``cleanup_on_client_exit``. Every
rule it adds where the docs are silent is in this table (details in the
docstrings of ``model``, ``flow``, ``binding``, ``core``, ``scheduler``,
``attributes`` and ``cache``):

=============================  ==========================================================
topic                          rule the docs do not state
=============================  ==========================================================
BIND                           only to a worker that reported IDLE on ``WorkerUpdate``
                               (after registering, after each UNBIND); a worker that
                               half-closed it counts as idle once unbound and streamless
UNBIND                         immediate on the server; the ``WorkerStream`` stays open
                               until the batches in flight are answered, then ends OK
unbind timers                  nothing queued or in flight for ``unbind_idle_after_s``
                               (1 s); no ``WorkerStream`` within ``stream_open_timeout_s``
                               (30 s) of BIND; a batch held over ``batch_timeout_s`` (off)
                               fails the stream (its batches re-queued, late answer dropped)
stream lost                    a bound worker whose stream ends from its side is unbound;
                               its batches in flight go to the front of the queue
connection lost                a call that breaks (cancelled by its worker's end) keeps
                               the other streams of its connection (gRPC peer) from new
                               batches for ``LOST_PEER_S`` (0.5 s): they break with it
delivery count                 a batch delivered ``max_deliveries`` (3) times without an
                               answer is dead-lettered ("delivered N times ...")
batch order                    highest ``Batch.priority`` first, FIFO within a priority
in-flight window               ``max_inflight_batches_per_worker`` per stream (0 = 10)
result matching                per task by ``related_id``, else ``id``, else position;
                               unanswered tasks re-queued under the same batch id; a
                               result not in flight on its stream is dropped (counted)
batch ids                      a reused live batch id travels under an internal id and is
                               answered under the client's
dead letters                   read once: ``ClientStreamDeadLetters`` drains the queue;
                               payloads kept so a client can resubmit
CloseSession (no cleanup)      queued batches become dead letters ("closed before it
                               ran"), in-flight ones are answered; results and dead
                               letters stay readable until drained / ``idle_timeout``
CloseSession (cleanup)         streams end at once, queued and in-flight work is dropped;
                               ``join`` raises ``SessionClosed`` with the count
client exit                    with ``cleanup_on_client_exit``, the session closes once no
                               client stream of it is open (cancel or disconnect)
client stream end              after the client half-closes, once every task of its
                               sessions is answered and handed over
idle reaping                   no client stream, nothing queued or in flight for
                               ``idle_timeout`` (unset/0 = 60 s): closed, results dropped
closed ids                     the last 10,000 are remembered (idempotent CloseSession)
scheduling                     highest priority first; then below ``min_workers``; then
                               fewest workers; then oldest
preemption                     lower-priority preemptible sessions lose workers (lowest
                               first, most workers first), no more than the demand
fair share                     a session with work and no worker takes one from an equal
                               priority *preemptible* session holding two or more
attributes                     defaults per ``attributes``; UpdateSession is partial;
                               bools can be switched on, never off
WorkerStream matching          by ``workerid`` metadata, else node + pod
shared data                    levels per session; no level = the newest unexpired; ttl
                               unset = never expires; node cache reads through
=============================  ==========================================================
"""

from __future__ import annotations

from ray_alpcrun.config import DevServerConfig
from ray_alpcrun.devserver.errors import Rejected, SessionClosed
from ray_alpcrun.devserver.server import LocalServices

__all__ = ["DevServerConfig", "LocalServices", "Rejected", "SessionClosed"]
