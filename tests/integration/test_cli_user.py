"""What a user meets at the three command lines (issue 11): ``--version``,
``--help`` with defaults and exit codes, "unknown flag", per-actor flags without
``--actors``, a signal during startup, a drain that stops taking batches,
``on_session_end`` at stop, and ``--log-json`` where every line is JSON; and
(issue 20) joining a Ray cluster started by hand, whose head asks for a token.

Bridge runs join the test session's Ray cluster (``--ray-address``), except the
startup-signal ones, which must start their own Ray to be interrupted in it,
and the hand-started-cluster ones, which join a head of their own.
"""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ray_alpcrun import __version__, errors
from ray_alpcrun.bridge.launch import start_bridge
from ray_alpcrun.devserver import LocalServices
from tests.support.bridge_support import assert_exactly_once, bridge_config, client_for, ray_get
from tests.support.cli_support import Cli, json_records, run, sigterm_midway
from tests.support.devserver_kit import free_config
from tests.support.fake_autoscaler import free_port
from tests.support.ray_head import RAY_AUTH_VARS, HandStartedHead, write_token

pytestmark = pytest.mark.timeout(180)
KEY = "cli-user-key-7f3a"
CLIS = ("ray_alpcrun.bridge", "ray_alpcrun.devserver", "ray_alpcrun.refworker")


@pytest.fixture(scope="module")
def ray_address(ray_session: Any) -> str:
    return str(ray_session.get_runtime_context().gcs_address)


@pytest.fixture
def svc() -> Iterator[LocalServices]:
    with LocalServices(free_config(api_key=KEY)) as services:
        yield services


def bridge(svc: LocalServices, ray_address: str, *args: str) -> Cli:
    return Cli(
        "ray_alpcrun.bridge",
        ["--queue", svc.queue_address, "--cache", svc.node_cache_address,
         "--ray-address", ray_address, "--cpus-per-actor", "0.5", *args],
        env={"METALCORE_API_KEY": KEY},
    )  # fmt: skip


@pytest.mark.parametrize("module", CLIS)
def test_version_help_and_a_mistyped_flag(module: str) -> None:
    code, out = run(module, "--version")
    assert code == 0 and __version__ in out, out
    code, out = run(module, "--help")
    assert code == 0, out
    assert "exit codes:" in out and "(default: " in out, out
    code, out = run(module, "--handlr", "x")
    assert code == errors.EXIT_USAGE, out
    assert "unknown flag: --handlr" in out and "required" not in out, out
    # The line that matters and where to look, not the usage block (34 lines).
    assert out.splitlines() == [
        f"python -m {module}: error: unknown flag: --handlr",
        f"(see python -m {module} --help)",
    ], out


def test_actors_0_is_rejected() -> None:
    code, out = run("ray_alpcrun.bridge", "--handler", "tests.support.bridge_handlers:echo",
                    "--actors", "0", "--api-key", KEY)  # fmt: skip
    assert code == errors.EXIT_CONFIG, out
    assert "--actors must be at least 1" in out


def test_gpus_per_actor_applies_without_actors(ray_address: str, svc: LocalServices) -> None:
    # The test cluster has no GPU: the flag must not silently give CPU actors.
    run_ = bridge(svc, ray_address, "--handler", "tests.support.bridge_handlers:echo",
                  "--gpus-per-actor", "1")  # fmt: skip
    code, out = run_.wait(120)
    assert code == errors.EXIT_CONFIG, out
    assert "GPU" in out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_startup_stops_it(signum: int) -> None:
    run_ = Cli(
        "ray_alpcrun.bridge",
        ["--handler", "tests.support.bridge_handlers:echo", "--actors", "1",
         "--cpus-per-actor", "0.5",
         "--queue", "127.0.0.1:9", "--cache", "127.0.0.1:9"],
        env={"METALCORE_API_KEY": KEY},
    )  # fmt: skip
    run_.wait_for("starting Ray")  # its own Ray starts now: the signal lands inside ray.init
    run_.proc.send_signal(signum)
    code, out = run_.wait(150)  # ray.init finishes first, then Ray shuts down
    assert code == errors.EXIT_INTERRUPTED, out
    assert f"interrupted during startup ({signal.Signals(signum).name})" in out, out
    assert "bridge serving" not in out


@pytest.mark.parametrize("flag", ["--queue-port", "--central-cache-port", "--node-cache-port"])
def test_busy_port_with_log_json_is_json_and_exit_3(flag: str) -> None:
    """Checked before gRPC binds: its C core would print a plain line first."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"--queue-port": "0", "--central-cache-port": "0", "--node-cache-port": "0"}
        args = [a for f, p in {**ports, flag: str(port)}.items() for a in (f, p)]
        code, out = run("ray_alpcrun.devserver", "--log-json", "--api-key", KEY, *args)
    assert code == errors.EXIT_CONFIG, out
    (record,) = json_records(out)
    assert record["msg"].endswith(f"cannot listen on 127.0.0.1:{port}: Address already in use")


def test_sigterm_stops_taking_batches(ray_address: str, svc: LocalServices) -> None:
    """Fed continuously, a draining bridge starts no new batch: it answers those
    running and exits 0 long before --drain-timeout; the rest is re-delivered."""
    n = 2000
    run_ = bridge(svc, ray_address, "--handler", "tests.support.bridge_handlers:slower",
                  "--actors", "2", "--drain-timeout", "60")  # fmt: skip
    # After 40 results: SIGTERM, then another bridge finishes the session.
    d = sigterm_midway(
        svc, run_, n, after=40, app_id="drain-continuous", finisher_actors=2, slots=2
    )
    print(f"\ncontinuous feed: exit {d.code} {d.drain_s:.2f} s after SIGTERM", flush=True)
    assert d.code == 0, d.out
    assert "drain deadline passed" not in d.out, d.out  # finished what it started, in time
    assert "result dropped" not in d.out, d.out  # every batch it started was answered
    # The log ends saying the stop finished (Ray may still forward actor lines after it).
    driver = [line for line in d.out.splitlines() if line and not line.startswith("(")]
    stopped = re.search(r"stopped: (\d+) batches drained, (\d+) not started, exit 0$", driver[-1])
    assert stopped and int(stopped[1]) >= 1, driver[-3:]
    # Not waiting out --drain-timeout 60 is the point (before: the whole 60 s). The
    # bridge's own "session drained" line is not asserted: Ray may not forward an
    # actor's last lines before the driver exits.
    assert d.drain_s < 45, f"drain took {d.drain_s:.1f} s of --drain-timeout 60"
    assert "\x1b[" not in d.out  # no colour codes in a file
    assert_exactly_once(d.results, n)


def test_session_end_runs_at_stop(
    ray_address: str, svc: LocalServices, tmp_path: Path, ray_session: Any
) -> None:
    """A session closed shortly before the stop is ended then, not never."""
    handle = start_bridge(bridge_config(svc, "tests.support.bridge_handlers:EndMarker", 1))
    try:
        handle.wait_ready(60)
        with client_for(svc) as client:
            session = client.create_session(app_id="end-at-stop")
            assert all(r.ok for r in session.run([str(tmp_path).encode()] * 3))
            session_id = session.id
            session.close()
    finally:
        ray_get(handle.stop(drain=True))
        assert ray_get(handle.run_ref)[0] == 0
    assert (tmp_path / f"ended-{session_id}").exists()


def test_every_line_is_json_with_log_json(
    ray_address: str, svc: LocalServices, tmp_path: Path
) -> None:
    """Bridge (with --local: what Ray forwards from the actors, handler
    tracebacks), devserver and reference worker: every line parses as JSON."""
    local = Cli(
        "ray_alpcrun.bridge",
        ["--local", "--log-json", "--handler", "tests.support.bridge_handlers:echo",
         "--actors", "1",
         "--cpus-per-actor", "0.5", "--queue", "127.0.0.1:0", "--cache", "127.0.0.1:0",
         "--ray-address", ray_address],
    )  # fmt: skip
    devserver = Cli("ray_alpcrun.devserver", ["--log-json", "--queue-port", "0",
                    "--central-cache-port", "0", "--node-cache-port", "0"])  # fmt: skip
    refworker = Cli(
        "ray_alpcrun.refworker",
        ["--log-json", "--handler", "tests.support.bridge_handlers:echo",
         "--queue", svc.queue_address, "--cache", svc.node_cache_address],
        env={"METALCORE_API_KEY": KEY},
    )  # fmt: skip
    try:
        local.wait_for('"registered"')
        devserver.wait_for("ready; stop with Ctrl-C")
        refworker.wait_for("worker registered")
        with client_for(svc) as client, client.create_session(app_id="json") as session:
            # A failing task: its traceback is logged, as JSON.
            assert [r.ok for r in session.run([b"ok", b"fail-me"])] == [True, False]
    finally:
        for cli in (local, devserver, refworker):
            cli.proc.send_signal(signal.SIGTERM)
        codes_outs = [cli.wait(90) for cli in (local, devserver, refworker)]
    for code, out in codes_outs:
        assert code == 0, out
        assert json_records(out)
    bridge_records, _, worker_records = (json_records(out) for _, out in codes_outs)
    assert any(r.get("actor") == "Bridge" for r in bridge_records)
    failed = [r for r in worker_records if r["msg"].startswith("task failed in the handler")]
    assert failed and "Traceback" in failed[0]["exc"] and "asked to fail" in failed[0]["exc"]


@pytest.fixture(scope="module")
def token_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HandStartedHead]:
    """``ray start --head --num-cpus 1 --port P`` where ``~/.ray/auth_token`` exists
    (as after a first ``ray.init()``): Ray turns token authentication on for it."""
    home = tmp_path_factory.mktemp("home")
    write_token(home)
    head = HandStartedHead(home)
    head.start()
    try:
        yield head
    finally:
        assert not head.stop(), "processes of the hand-started head survived"


def joining(address: str, home: Path, *args: str) -> Cli:
    """The bridge CLI joining ``address`` as a new user's shell would run it:
    HOME=home, no RAY_AUTH_* set."""
    return Cli(
        "ray_alpcrun.bridge",
        ["--ray-address", address, "--handler", "tests.support.bridge_handlers:echo",
         "--actors", "1", "--cpus-per-actor", "0.5", *args],
        env={"METALCORE_API_KEY": KEY, "HOME": str(home)},
        unset=RAY_AUTH_VARS,
    )  # fmt: skip


def test_a_bridge_joins_a_cluster_whose_head_asks_for_a_token(
    token_head: HandStartedHead, svc: LocalServices
) -> None:
    """Before: ~20 s of Ray's InvalidAuthToken lines, a traceback, exit 1 (the
    token was at hand, RAY_AUTH_MODE=token was not set). Now it joins and serves."""
    run_ = joining(token_head.address, token_head.home,
                   "--queue", svc.queue_address, "--cache", svc.node_cache_address)  # fmt: skip
    try:
        run_.wait_for("bridge serving", 120)
        with client_for(svc) as client, client.create_session(app_id="joined") as session:
            assert [r.payload for r in session.run([b"a", b"b", b"c"])] == [b"a", b"b", b"c"]
    finally:
        run_.proc.send_signal(signal.SIGTERM)
        code, out = run_.wait(90)
    assert code == 0, out
    assert "joining with Ray token authentication (RAY_AUTH_MODE=token)" in out, out
    assert "InvalidAuthToken" not in out and "Traceback" not in out, out
    assert re.search(r"stopped: \d+ batches drained, \d+ not started, exit 0", out), out


def test_joining_without_the_token_exits_3_in_one_line(
    token_head: HandStartedHead, tmp_path: Path
) -> None:
    """No token here: exit 3 with the fix, before ray.init (none of its retry lines)."""
    run_ = joining(token_head.address, tmp_path, "--queue", "127.0.0.1:9", "--cache", "127.0.0.1:9")
    code, out = run_.wait(60)
    assert code == errors.EXIT_CONFIG, out
    (line,) = [x for x in out.splitlines() if x.startswith("ray_alpcrun.bridge: ")]
    assert f"the Ray cluster at {token_head.address} uses token authentication" in line, out
    assert "no token is found here" in line and "ray get-auth-token" in line, out
    assert "InvalidAuthToken" not in out and "Traceback" not in out, out


def test_joining_an_address_where_nothing_listens_exits_3_in_one_line(tmp_path: Path) -> None:
    """Before: ray.init retried for minutes (killed here after 60 s)."""
    address = f"127.0.0.1:{free_port()}"
    code, out = joining(address, tmp_path, "--queue", "127.0.0.1:9", "--cache", "127.0.0.1:9").wait(
        60
    )
    assert code == errors.EXIT_CONFIG, out
    assert f"ray_alpcrun.bridge: no Ray cluster at {address}: connection refused" in out, out
    assert "Traceback" not in out, out
