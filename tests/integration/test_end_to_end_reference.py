"""End to end without Ray: client -> local queue manager -> reference worker -> client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_alpcrun.client import Client
from ray_alpcrun.config import DevServerConfig, ServiceConfig
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.transport import MD_SESSION_ID, Stub, make_metadata, open_channel
from ray_alpcrun.types import Batch, Message, SessionAttributes, SessionInfo
from tests.support.refworker_support import Gate, assert_exactly_once, mixed, start_worker

ROOT = Path(__file__).resolve().parents[2]


def free_services(**kwargs: object) -> LocalServices:
    return LocalServices(
        DevServerConfig(queue_port=0, central_cache_port=0, node_cache_port=0, **kwargs)  # type: ignore[arg-type]
    )


def client_for(svc: LocalServices) -> Client:
    return Client(
        queue=svc.queue_address,
        central_cache=svc.central_cache_address,
        api_key=svc.api_key,
        proto_package=svc.proto_package,
    )


@pytest.fixture
def services() -> Iterator[LocalServices]:
    with free_services() as svc:
        yield svc


def test_ten_thousand_tasks_each_answered_once(services: LocalServices) -> None:
    worker = start_worker(services.service_config(), "ray_alpcrun.examples.workloads:noop")
    payloads = [b"task-%05d" % i for i in range(10_000)]
    try:
        with client_for(services) as client, client.create_session(app_id="10k") as session:
            results = session.run(payloads, batch_size=100, timeout_s=60)
            services.join(session.id, timeout_s=10)
    finally:
        worker.stop()
    results = assert_exactly_once(results, len(payloads))
    assert [r.value() for r in results] == payloads
    stats = services.stats()
    assert stats["result_tasks"] == 10_000
    assert stats["redeliveries"] == 0 and stats["dead_lettered_tasks"] == 0
    assert worker.worker.stats.tasks == 10_000


async def test_result_batches_follow_the_section_5_3_rules(services: LocalServices) -> None:
    """Raw gRPC, no client library: batch id, session id, id, related_id, error."""
    worker = start_worker(services.service_config(), mixed)
    channel = open_channel(services.queue_address)
    try:
        queue = Stub(channel, "Queue", services.proto_package)
        md = make_metadata(services.api_key)
        session = await queue.CreateSession(
            SessionInfo(app_id="rules", attributes=SessionAttributes()), metadata=md
        )
        call = queue.ClientStream(metadata=(*md, (MD_SESSION_ID, session.id)))
        sent = {
            "b1": ["t1", "t2"],
            "b2": ["t3"],
        }
        await call.write(
            Batch("b1", session.id, messages=[Message("t1", b"one"), Message("t2", b"fail!")])
        )
        await call.write(Batch("b2", session.id, messages=[Message("t3", b"three")]))
        await call.done_writing()
        got = [batch async for batch in call]
    finally:
        await channel.close(None)
        worker.stop()
    assert sorted(b.id for b in got) == ["b1", "b2"]
    for b in got:
        assert b.session_id == session.id and not b.dead
        assert [m.id for m in b.messages] == sent[b.id]
        assert all(m.related_id == m.id for m in b.messages)
    answers = {m.id: m for b in got for m in b.messages}
    assert answers["t1"].payload == b"one" and answers["t1"].error is None
    assert (
        answers["t2"].payload == b"" and answers["t2"].error == "ValueError: asked to fail: fail!"
    )
    assert answers["t3"].payload == b"three"


def test_killed_worker_loses_and_doubles_nothing(services: LocalServices) -> None:
    service = services.service_config()
    gate = Gate(free=50)  # answers 5 batches, then holds a batch and the window behind it
    doomed = start_worker(service, gate, pod="doomed")
    payloads = [b"%d" % i for i in range(2000)]
    with client_for(services) as client, client.create_session(app_id="kill") as session:
        results_iter = session.submit(payloads, batch_size=10, timeout_s=60)
        first = next(results_iter)  # sending has started
        assert gate.blocked.wait(10), "the doomed worker never got busy"
        survivor = start_worker(service, "ray_alpcrun.examples.workloads:noop", pod="survivor")
        doomed.kill()
        gate.opened.set()  # its handler thread finishes; the answer goes nowhere
        results = [first, *results_iter]
    survivor.stop()
    results = assert_exactly_once(results, len(payloads))
    assert [r.value() for r in results] == payloads
    assert Counter(r.task_id for r in results) == Counter({r.task_id: 1 for r in results})
    stats = services.stats()
    assert stats["redeliveries"] >= 1  # the doomed worker's window went to the survivor
    assert stats["dead_lettered_tasks"] == 0
    assert stats["result_tasks"] == len(payloads)


@pytest.mark.parametrize("package", ["", "metalcore.api.v1"])
def test_other_proto_packages(package: str) -> None:
    with free_services(proto_package=package) as svc:
        worker = start_worker(svc.service_config(), mixed)
        try:
            with client_for(svc) as client, client.create_session(app_id="pkg") as session:
                assert session.map([b"a", b"b", b"c"], batch_size=2) == [b"a", b"b", b"c"]
        finally:
            worker.stop()


def _cli(svc: LocalServices, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), METALCORE_API_KEY=svc.api_key)
    return subprocess.Popen(
        [
            sys.executable, "-m", "ray_alpcrun.refworker",
            "--queue", svc.queue_address,
            "--cache", svc.node_cache_address,
            "--proto-package", svc.proto_package,
            "--log-level", "warning",
            *extra,
        ],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_cli_worker_serves_and_stops_on_sigterm(services: LocalServices) -> None:
    proc = _cli(services, "--handler", "ray_alpcrun.examples.workloads:noop")
    try:
        with client_for(services) as client, client.create_session(app_id="cli") as session:
            payloads = [b"%d" % i for i in range(500)]
            assert session.map(payloads, batch_size=50, timeout_s=60) == payloads
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_cli_exit_codes(services: LocalServices) -> None:
    bad_handler = _cli(services, "--handler", "ray_alpcrun.examples.workloads:nope")
    out, _ = bad_handler.communicate(timeout=30)
    assert bad_handler.returncode == 6 and "nope" in out
    bad_key = _cli(
        services, "--handler", "ray_alpcrun.examples.workloads:noop", "--api-key", "wrong"
    )
    out, _ = bad_key.communicate(timeout=30)
    assert bad_key.returncode == 4 and "API key" in out
    unreachable = _cli(
        services, "--handler", "ray_alpcrun.examples.workloads:noop", "--queue", "127.0.0.1:9",
        "--connect-timeout", "0.2", "--connect-attempts", "1",
    )  # fmt: skip
    out, _ = unreachable.communicate(timeout=30)
    assert unreachable.returncode == 7 and "127.0.0.1:9" in out


def test_shared_data_from_the_node_cache(services: LocalServices) -> None:
    import numpy as np

    worker = start_worker(services.service_config(), "ray_alpcrun.examples.workloads:shared_sum")
    values = np.arange(100_000, dtype="<i8")
    try:
        with client_for(services) as client, client.create_session(app_id="sum") as session:
            session.set_shared_data(values.tobytes())
            spans = [(i, i + 1000) for i in range(0, 100_000, 1000)]
            got = session.map([b"%d:%d" % s for s in spans], batch_size=10)
    finally:
        worker.stop()
    assert got == [str(values[a:b].sum()).encode() for a, b in spans]
    assert worker.worker.stats.shared_fetches == 1
    assert services.stats()["node_central_fetches"] == 1


def test_worker_identity_without_kubernetes(services: LocalServices) -> None:
    service: ServiceConfig = services.service_config()
    worker = start_worker(service, mixed)
    try:
        assert worker.worker_id and len(worker.worker_id) == 26
        assert services.stats()["workers"] == 1
    finally:
        worker.stop()


def test_unbind_then_bind_to_the_session_with_work() -> None:
    with free_services(unbind_idle_after_s=0.1) as svc:
        worker = start_worker(svc.service_config(), mixed)
        try:
            with client_for(svc) as client:
                first = client.create_session(app_id="first")
                assert first.map([b"a"]) == [b"a"]
                # `first` stays open but idle: the worker is unbound and goes
                # where the work is.
                with client.create_session(app_id="second") as second:
                    assert second.map([b"b"] * 50, batch_size=5) == [b"b"] * 50
                first.close()
        finally:
            worker.stop()
        stats = svc.stats()
    assert worker.worker.stats.bindings == 2
    assert stats["unbinds"] >= 1 and stats["redeliveries"] == 0
    assert worker.worker.stats.dropped_batches == 0


def test_graceful_stop_mid_session_loses_nothing(services: LocalServices) -> None:
    service = services.service_config()
    gate = Gate(free=30)
    leaving = start_worker(service, gate, pod="leaving")
    payloads = [b"%d" % i for i in range(1000)]
    with client_for(services) as client, client.create_session(app_id="stop") as session:
        results_iter = session.submit(payloads, batch_size=10, timeout_s=60)
        first = next(results_iter)
        assert gate.blocked.wait(10)
        staying = start_worker(service, "ray_alpcrun.examples.workloads:noop", pod="staying")
        stopper = threading.Thread(target=leaving.stop)
        stopper.start()
        gate.opened.set()  # the batch in hand is answered, then the stream half-closes
        results = [first, *results_iter]
        stopper.join()
    staying.stop()
    results = assert_exactly_once(results, len(payloads))
    assert [r.value() for r in results] == payloads
    assert services.stats()["dead_lettered_tasks"] == 0


def test_tls_client_and_worker(tmp_path: Path) -> None:
    from ray_alpcrun.transport import TlsFiles
    from tests.support.certs import self_signed

    pem = self_signed(tmp_path)
    server_tls = TlsFiles(cert=pem.cert, key=pem.key)
    with free_services(tls=server_tls) as svc:
        worker = start_worker(svc.service_config(), mixed)  # trusts the server's certificate
        try:
            with (
                Client(
                    queue=svc.queue_address,
                    central_cache=svc.central_cache_address,
                    api_key=svc.api_key,
                    tls=pem.cert,  # a CA bundle path is enough
                ) as client,
                client.create_session(app_id="tls") as session,
            ):
                session.set_shared_data(b"\x01\x00\x00\x00\x00\x00\x00\x00" * 4)
                assert session.map([b"sum:0:4", b"plain"]) == [b"4", b"plain"]
        finally:
            worker.stop()


def test_tls_queue_manager_with_plaintext_node_cache(tmp_path: Path) -> None:
    """The guide's deployment: TLS to the queue manager, plaintext to the node cache
    on another port of the same services (before: one TLS setting for both)."""
    from ray_alpcrun.transport import TlsFiles
    from tests.support.certs import self_signed

    pem = self_signed(tmp_path)
    server_tls = TlsFiles(cert=pem.cert, key=pem.key)
    with free_services(tls=server_tls, plaintext_services=("node",)) as svc:
        config = svc.service_config()
        assert config.tls is not None and config.cache_tls is None
        worker = start_worker(config, mixed)
        try:
            with (
                Client(
                    queue=svc.queue_address,
                    central_cache=svc.central_cache_address,
                    api_key=svc.api_key,
                    tls=pem.cert,
                ) as client,
                client.create_session(app_id="tls-mix") as session,
            ):
                session.set_shared_data(b"\x02\x00\x00\x00\x00\x00\x00\x00" * 4)
                assert session.map([b"sum:0:4", b"plain"]) == [b"8", b"plain"]
        finally:
            worker.stop()
        assert worker.worker.stats.shared_fetches >= 1


def test_in_flight_window_respected_at_the_server(services: LocalServices) -> None:
    # ~5 ms per task: the client sends far faster, so the window is always full.
    worker = start_worker(services.service_config(), "ray_alpcrun.examples.workloads:cpu")
    try:
        with client_for(services) as client:
            with client.create_session(app_id="narrow", max_inflight_batches_per_worker=2) as s:
                assert len(s.map([b"x"] * 30, batch_size=1)) == 30
            narrow = dict(services.stats()["max_inflight_seen_per_worker"])
            with client.create_session(app_id="default") as s:
                assert len(s.map([b"x"] * 60, batch_size=1)) == 60
    finally:
        worker.stop()
    assert narrow == {worker.worker_id: 2}
    assert services.stats()["max_inflight_seen_per_worker"] == {worker.worker_id: 10}


def test_worker_config_from_env() -> None:
    from ray_alpcrun.config import Env
    from ray_alpcrun.refworker import ReferenceWorkerConfig

    env = Env(api_key="k", worker_node="n1", worker_pod="p1", queue_addr="qm:1337")
    config = ReferenceWorkerConfig.from_env(env, drain_timeout_s=1.0)
    assert (config.identity.node, config.identity.pod) == ("n1", "p1")
    assert config.service.queue_address == "qm:1337" and config.service.api_key == "k"
    assert config.service.cache_address == "127.0.0.1:3337" and config.drain_timeout_s == 1.0
