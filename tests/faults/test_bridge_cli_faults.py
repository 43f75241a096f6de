"""``python -m ray_alpcrun.bridge`` as a subprocess: fatal configuration errors
stop it within seconds with one clear line and a distinct exit code; SIGTERM
drains the batches in flight (starting no new one) and exits 0; a second signal exits at once (130).

Runs that need Ray join the test session's cluster (``--ray-address``) so each
costs a driver connection, not a Ray start. The wall-clock to exit is printed
(``pytest -s``); ``BRIDGE_CLI_STANDALONE=1`` makes every run start its own Ray,
as in production.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ray_alpcrun import errors
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.transport import TlsFiles
from tests.support.bridge_support import assert_exactly_once, client_for
from tests.support.certs import self_signed
from tests.support.cli_support import Cli, sigterm_midway
from tests.support.devserver_kit import free_config

pytestmark = pytest.mark.timeout(180)
KEY = "cli-fault-key-4b1d9e"
WRONG_KEY = "wrong-key-never-print-me-93c2"


@pytest.fixture(scope="module")
def ray_address(ray_session: Any) -> str | None:
    if os.environ.get("BRIDGE_CLI_STANDALONE"):
        return None
    return str(ray_session.get_runtime_context().gcs_address)


def services(**kw: Any) -> LocalServices:
    return LocalServices(free_config(**kw))


class Bridge(Cli):
    """The bridge CLI (or ``module``) with two half-CPU actors, ``key`` as its
    METALCORE_API_KEY (none when None), joining ``ray_address`` when given."""

    def __init__(
        self,
        args: list[str],
        key: str | None,
        ray_address: str | None,
        module: str = "ray_alpcrun.bridge",
    ) -> None:
        if ray_address is not None:
            args = [*args, "--ray-address", ray_address]
        env = {"METALCORE_API_KEY": key} if key is not None else None
        super().__init__(module, ["--actors", "2", "--cpus-per-actor", "0.5", *args], env)


def reason_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("ray_alpcrun.bridge: ")]
    assert len(lines) == 1, out
    return lines[0]


def test_unknown_handler_exits_6_before_ray_starts() -> None:
    run = Bridge(["--handler", "tests.no_such_module:fn"], KEY, None)
    code, elapsed, out = run.wait_timed(30)
    print(f"\nunknown handler: exit {code} after {elapsed:.2f} s", flush=True)
    assert code == errors.EXIT_HANDLER, out
    assert "tests.no_such_module" in reason_line(out)
    assert "Started a local Ray instance" not in out


def test_missing_api_key_exits_4_before_ray_starts() -> None:
    run = Bridge(["--handler", "tests.support.bridge_handlers:echo"], None, None)
    code, elapsed, out = run.wait_timed(30)
    print(f"\nmissing API key: exit {code} after {elapsed:.2f} s", flush=True)
    assert code == errors.EXIT_AUTH, out
    assert "API key" in reason_line(out) and "METALCORE_API_KEY" in reason_line(out)


def test_wrong_api_key_exits_4_within_seconds_without_printing_it(
    ray_address: str | None,
) -> None:
    with services(api_key=KEY) as svc:
        run = Bridge(
            ["--handler", "tests.support.bridge_handlers:echo", "--queue", svc.queue_address,
             "--cache", svc.node_cache_address], WRONG_KEY, ray_address,
        )  # fmt: skip
        code, elapsed, out = run.wait_timed()
    print(f"\nwrong API key: exit {code} after {elapsed:.2f} s", flush=True)
    assert code == errors.EXIT_AUTH, out
    line = reason_line(out)
    assert "the node cache rejected the API key (PERMISSION_DENIED" in line, line
    assert WRONG_KEY not in out and KEY not in out
    assert "starting Ray" not in out, out  # checked before Ray starts (it took 6 s)
    assert elapsed < 30


def test_a_server_certificate_not_signed_by_the_ca_exits_5(
    ray_address: str | None, tmp_path: Path
) -> None:
    server = self_signed(tmp_path / "server")
    other_ca = self_signed(tmp_path / "other", common_name="other-ca")
    with services(api_key=KEY, tls=TlsFiles(cert=server.cert, key=server.key)) as svc:
        run = Bridge(
            ["--handler", "tests.support.bridge_handlers:echo", "--queue", svc.queue_address,
             "--cache", svc.node_cache_address, "--ca-cert", other_ca.cert,
             # The node cache's trust is right: the queue manager's is what is wrong.
             "--cache-ca-cert", server.cert], KEY, ray_address,
        )  # fmt: skip
        code, elapsed, out = run.wait_timed()
    print(f"\nbad CA: exit {code} after {elapsed:.2f} s", flush=True)
    assert code == errors.EXIT_TLS, out
    line = reason_line(out)
    assert "TLS" in line and other_ca.cert in line and "--ca-cert" in line
    assert elapsed < 30


def test_an_unreachable_queue_manager_exits_7_and_never_says_serving(
    ray_address: str | None,
) -> None:
    """ "bridge serving" waits for the queue manager to take a logical worker
    (it was logged once the actors had started, the queue manager unreached)."""
    with services(api_key=KEY) as svc:  # a node cache that answers; no queue manager
        run = Bridge(
            ["--handler", "tests.support.bridge_handlers:echo", "--queue", "127.0.0.1:9",
             "--cache", svc.node_cache_address, "--proto-package", svc.proto_package or "",
             "--connect-attempts", "4", "--backoff-max", "1"],
            KEY, ray_address,
        )  # fmt: skip
        code, out = run.wait(120)
    assert code == errors.EXIT_UNAVAILABLE, out
    assert "queue manager at 127.0.0.1:9 unreachable after 4 attempts" in reason_line(out)
    assert "actor pool started" in out, out  # the actors were up: it could have said so
    assert "bridge serving" not in out, out


def test_a_wrong_cache_address_is_named_at_once_and_no_work_is_taken(
    ray_address: str | None,
) -> None:
    """A ``--cache`` where nothing listens: the bridge says so within seconds,
    naming the address, takes no work (never registers, never says serving), and
    with --connect-attempts exits 7 naming it (it used to register and dead-letter
    every batch with shared data)."""
    with services(api_key=KEY) as svc:
        run = Bridge(
            ["--handler", "tests.support.bridge_handlers:echo", "--queue", svc.queue_address,
             "--cache", "127.0.0.1:2", "--proto-package", svc.proto_package or "",
             "--connect-attempts", "3", "--backoff-max", "1"],
            KEY, ray_address,
        )  # fmt: skip
        code, out = run.wait(120)
        registered = svc.stats()["workers"]
    assert code == errors.EXIT_UNAVAILABLE, out
    assert "node cache unreachable: taking no work until it answers" in out, out
    assert "address=127.0.0.1:2" in out, out
    assert "node cache at 127.0.0.1:2 unreachable after 3 attempts" in reason_line(out), out
    assert "bridge serving" not in out and registered == 0, out


def test_a_bridge_actor_that_dies_at_start_exits_3_in_one_line(ray_address: str | None) -> None:
    """Its process exits in ``__init__`` (as when it cannot join the cluster):
    one line saying so, exit 3, no traceback (Ray's ActorDiedError went through)."""
    run = Bridge(
        ["--handler", "tests.support.bridge_handlers:echo", "--queue", "127.0.0.1:9",
         "--cache", "127.0.0.1:9"], KEY, ray_address, module="tests.support.dying_bridge",
    )  # fmt: skip
    code, elapsed, out = run.wait_timed(60)
    print(f"\nbridge actor dead at start: exit {code} after {elapsed:.2f} s", flush=True)
    assert code == errors.EXIT_CONFIG, out
    assert "the bridge actor died before it could serve: " in reason_line(out)
    assert "Traceback" not in out


@pytest.fixture
def drained_services() -> Iterator[LocalServices]:
    with services(api_key=KEY) as svc:
        yield svc


def test_sigterm_drains_in_flight_batches_then_exits_0(
    ray_address: str | None, drained_services: LocalServices
) -> None:
    svc = drained_services
    n = 400
    run = Bridge(
        ["--handler", "tests.support.bridge_handlers:slow", "--queue", svc.queue_address,
         "--cache", svc.node_cache_address, "--drain-timeout", "20"], KEY, ray_address,
    )  # fmt: skip
    # After 20 results: SIGTERM, then another bridge finishes the session, so that
    # nothing lost or doubled goes unseen.
    d = sigterm_midway(svc, run, n, after=20, app_id="drain", finisher_actors=1)
    print(f"\nSIGTERM: exit {d.code} {d.drain_s:.2f} s after, {d.in_flight} in flight", flush=True)
    assert d.code == 0, d.out
    assert d.in_flight >= 1
    # Every batch the drained bridge started was answered by it; those that
    # arrived after the signal were not started and went to the finisher.
    assert d.stats["dead_lettered_tasks"] == 0, d.stats
    assert "result dropped" not in d.out and "drain deadline passed" not in d.out, d.out
    assert KEY not in d.out
    assert re.search(r"INFO  ray_alpcrun.bridge: stopped: \d+ batches drained, \d+ not started, "
                     r"exit 0\n", d.out), d.out  # fmt: skip
    assert_exactly_once(d.results, n)
    assert all(r.payload == f"{r.index}".encode() for r in d.results)


def test_a_second_signal_exits_130_at_once(
    ray_address: str | None, drained_services: LocalServices
) -> None:
    svc = drained_services
    run = Bridge(
        ["--handler", "tests.support.bridge_handlers:slow", "--queue", svc.queue_address,
         "--cache", svc.node_cache_address, "--drain-timeout", "60"], KEY, ray_address,
    )  # fmt: skip
    with client_for(svc) as client:
        session = client.create_session(app_id="interrupt")
        it = session.submit([b"x"] * 2000, batch_size=50)
        assert next(it).ok  # the bridge is serving, batches are in flight
        run.proc.send_signal(signal.SIGTERM)
        run.proc.send_signal(signal.SIGINT)
        signalled = time.perf_counter()
        code, out = run.wait(60)
        session.close()
    print(f"\nsecond signal: exit {code} {time.perf_counter() - signalled:.2f} s after", flush=True)
    assert code == errors.EXIT_INTERRUPTED, out
