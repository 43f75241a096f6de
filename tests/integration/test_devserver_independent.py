"""The devserver against a worker and a client written from section 5.3 and the
seed guide alone: plain blocking grpcio and the generated messages, none of the
project's transport or wire code (as an outside implementation would be)."""

from __future__ import annotations

import json
import queue
import threading
from collections import Counter
from typing import Any

import grpc

from ray_alpcrun._proto import ghpc_pb2 as pb
from ray_alpcrun.devserver import LocalServices
from tests.support.devserver_kit import free_config

PKG = "/ghpc.v1"


def _stream(channel: grpc.Channel, path: str, request: Any, response: Any) -> Any:
    return channel.stream_stream(
        path,
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


class SeedWorker(threading.Thread):
    """The seed guide's worker, step by step, in Python."""

    def __init__(self, queue_addr: str, cache_addr: str, key: str, pod: str) -> None:
        super().__init__(daemon=True)
        self.key, self.pod = key, pod
        self.channel = grpc.insecure_channel(queue_addr)
        self.cache = grpc.insecure_channel(cache_addr)
        self.processed = 0
        self.states: queue.Queue[Any] = queue.Queue()
        self.call: Any = None
        self.registered = threading.Event()

    def run(self) -> None:
        md = [("api_key", self.key), ("node", "node-a"), ("pod", self.pod)]
        update = _stream(self.channel, f"{PKG}.Queue/WorkerUpdate", pb.WorkerState, pb.Instruction)
        self.call = update(iter(self.states.get, None), metadata=md)
        worker_id = dict(self.call.initial_metadata())["workerid"]
        self.registered.set()
        self.states.put(pb.WorkerState(worker_id=worker_id, status=pb.WorkerState.IDLE))
        try:
            for instruction in self.call:
                if instruction.type == pb.Instruction.BIND:
                    self.process_session(md, instruction.session_id)
                else:
                    self.states.put(pb.WorkerState(worker_id=worker_id, status=pb.WorkerState.IDLE))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED, exc

    def process_session(self, md: list[tuple[str, str]], session_id: str) -> None:
        results: queue.Queue[Any] = queue.Queue()
        open_stream = _stream(self.channel, f"{PKG}.Queue/WorkerStream", pb.Batch, pb.Batch)
        stream = open_stream(iter(results.get, None), metadata=[*md, ("sessionid", session_id)])
        try:
            for task_batch in stream:
                shared = b""
                if task_batch.use_shared_data:
                    get = self.cache.unary_unary(
                        f"{PKG}.Cache/GetSharedData",
                        request_serializer=pb.SharedData.SerializeToString,
                        response_deserializer=pb.SharedData.FromString,
                    )
                    request = pb.SharedData(session_id=task_batch.session_id)
                    if task_batch.HasField("required_shared_data_update_level"):
                        request.update_level = task_batch.required_shared_data_update_level
                    shared = get(request, metadata=[("api_key", self.key)]).payload
                out = pb.Batch(id=task_batch.id, session_id=task_batch.session_id, dead=False)
                for task in task_batch.messages:
                    value = json.loads(task.payload)
                    out.messages.add(
                        id=task.id,
                        payload=json.dumps({"x": value["x"], "shared": shared.decode()}).encode(),
                        related_id=task.id,
                    )
                self.processed += len(task_batch.messages)
                results.put(out)
        except grpc.RpcError:
            pass  # the stream ended (UNBIND or shutdown)
        finally:
            results.put(None)

    def stop(self) -> None:
        self.registered.wait(10)
        self.call.cancel()
        self.join(10)
        self.channel.close()
        self.cache.close()


def test_seed_worker_and_plain_client() -> None:
    n = 300
    with LocalServices(free_config(api_key="k")) as svc:
        workers = [
            SeedWorker(svc.queue_address, svc.node_cache_address, "k", f"pod-{i}") for i in range(2)
        ]
        for w in workers:
            w.start()
        md = [("api_key", "k")]
        try:
            with (
                grpc.insecure_channel(svc.queue_address) as q,
                grpc.insecure_channel(svc.central_cache_address) as central,
            ):
                create = q.unary_unary(
                    f"{PKG}.Queue/CreateSession",
                    request_serializer=pb.Session.SerializeToString,
                    response_deserializer=pb.Session.FromString,
                )
                request = pb.Session(app=pb.App(id="independent"))
                request.attributes.max_workers = 2
                request.attributes.max_inflight_batches_per_worker = 4
                session = create(request, metadata=md)
                set_shared = central.unary_unary(
                    f"{PKG}.Cache/SetSharedData",
                    request_serializer=pb.SharedData.SerializeToString,
                    response_deserializer=pb.Status.FromString,
                )
                shared = pb.SharedData(session_id=session.id, update_level=1, payload=b"table")
                shared.ttl.seconds = 600
                set_shared(shared, metadata=md)

                def batches() -> Any:
                    for i in range(n):  # one task per batch, as in the docs' examples
                        b = pb.Batch(session_id=session.id, use_shared_data=True)
                        b.required_shared_data_update_level = 1
                        b.messages.add(id=f"task-{i}", payload=json.dumps({"x": i}).encode())
                        yield b

                client = _stream(q, f"{PKG}.Queue/ClientStream", pb.Batch, pb.Batch)
                got: Counter[str] = Counter()
                for result in client(batches(), metadata=md):  # ends after the drain
                    for m in result.messages:
                        body = json.loads(m.payload)
                        assert body == {"x": int(m.related_id.split("-")[1]), "shared": "table"}
                        got[m.related_id] += 1
                assert got == Counter({f"task-{i}": 1 for i in range(n)})
                close = q.unary_unary(
                    f"{PKG}.Queue/CloseSession",
                    request_serializer=pb.Session.SerializeToString,
                    response_deserializer=pb.Status.FromString,
                )
                close(pb.Session(id=session.id), metadata=md)
        finally:
            for w in workers:
                w.stop()
        assert sum(w.processed for w in workers) == n
        stats = svc.stats()
        assert stats["central_get_calls"] == 1  # the node cache read through once for both
        assert max(stats["max_inflight_seen_per_worker"].values()) <= 4
