"""The devserver at the wire: API keys on every service, configurable proto
package, malformed bytes, TLS, and the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from ray_alpcrun import transport
from ray_alpcrun.config import Env
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.devserver.cli import EXIT_CONFIG, build_parser, config_from_args, main
from ray_alpcrun.types import Batch, SessionInfo, SharedData
from tests.support.certs import ca_signed, self_signed
from tests.support.devserver_kit import free_config, md


@pytest.fixture
async def svc() -> AsyncIterator[LocalServices]:
    async with LocalServices(free_config(api_key="right-key")) as services:
        yield services


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def header_then_read(call: Any) -> Any:
    await call.initial_metadata()
    return await call.read()


def calls(svc: LocalServices, channels: dict[str, grpc.aio.Channel], meta: Any) -> list[Any]:
    """One call of every kind, on every service."""
    queue = transport.Stub(channels["queue"], "Queue", svc.proto_package)
    central = transport.Stub(channels["central"], "Cache", svc.proto_package)
    node = transport.Stub(channels["node"], "Cache", svc.proto_package)
    worker_meta = (*meta, ("node", "n"), ("pod", "p"))
    return [
        queue.CreateSession(SessionInfo(app_id="x"), metadata=meta),
        queue.ClientStreamDeadLetters(SessionInfo(id="s"), metadata=meta).read(),
        # The worker waits for the response header before sending, as the seed does.
        header_then_read(queue.WorkerUpdate(iter(()), metadata=worker_meta)),
        queue.ClientStream(iter([Batch(session_id="s")]), metadata=meta).read(),
        central.GetSharedData(SharedData("s", 1), metadata=meta),
        node.GetSharedData(SharedData("s", 1), metadata=meta),
        node.SetSharedData(SharedData("s", 1, b"x"), metadata=meta),
    ]


@pytest.fixture
async def channels(svc: LocalServices) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    chans = {
        "queue": transport.open_channel(svc.queue_address),
        "central": transport.open_channel(svc.central_cache_address),
        "node": transport.open_channel(svc.node_cache_address),
    }
    yield chans
    for ch in chans.values():
        await ch.close(None)


async def test_missing_api_key(svc: LocalServices, channels: dict[str, grpc.aio.Channel]) -> None:
    for call in calls(svc, channels, ()):
        code, details = await code_of(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in details


async def test_wrong_api_key(svc: LocalServices, channels: dict[str, grpc.aio.Channel]) -> None:
    for call in calls(svc, channels, (("api_key", "wrong-key"),)):
        code, details = await code_of(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "API key" in details and "right-key" not in details


async def test_right_key_passes(svc: LocalServices, channels: dict[str, grpc.aio.Channel]) -> None:
    queue = transport.Stub(channels["queue"], "Queue", svc.proto_package)
    session = await queue.CreateSession(SessionInfo(app_id="x"), metadata=md(svc))
    assert session.id


@pytest.mark.parametrize("package", ["ghpc.v1", "", "metalcore.api.v1"])
async def test_proto_package(package: str) -> None:
    async with LocalServices(free_config(proto_package=package)) as svc:
        q = transport.open_channel(svc.queue_address)
        n = transport.open_channel(svc.node_cache_address)
        try:
            queue = transport.Stub(q, "Queue", package)
            assert (await queue.CreateSession(SessionInfo(app_id="x"), metadata=md(svc))).id
            node = transport.Stub(n, "Cache", package)
            await node.SetSharedData(SharedData("s", 1, b"x"), metadata=md(svc))
            assert (await node.GetSharedData(SharedData("s", 1), metadata=md(svc))).payload == b"x"
            other = "other.v9" if package else "ghpc.v1"
            wrong = transport.Stub(q, "Queue", other)
            code, _ = await code_of(wrong.CreateSession(SessionInfo(app_id="x"), metadata=md(svc)))
            assert code == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await q.close(None)
            await n.close(None)


async def test_message_size_limit() -> None:
    async with LocalServices(free_config(max_message_bytes=1024)) as svc:
        channel = transport.open_channel(svc.central_cache_address)
        try:
            central = transport.Stub(channel, "Cache", svc.proto_package)
            code, _ = await code_of(
                central.SetSharedData(SharedData("s", 1, b"x" * 4096), metadata=md(svc))
            )
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await channel.close(None)


async def test_malformed_bytes(svc: LocalServices, channels: dict[str, grpc.aio.Channel]) -> None:
    garbage = b"\x0a\xff\xff\xff"  # field 1, length far beyond the message
    pkg = svc.proto_package
    unary = channels["queue"].unary_unary(transport.method_path(pkg, "Queue", "CreateSession"))
    code, _ = await code_of(unary(garbage, metadata=md(svc)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    stream = channels["queue"].stream_stream(transport.method_path(pkg, "Queue", "ClientStream"))
    code, _ = await code_of(stream(iter([garbage]), metadata=md(svc)).read())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    cache = channels["node"].unary_unary(transport.method_path(pkg, "Cache", "GetSharedData"))
    code, _ = await code_of(cache(garbage, metadata=md(svc)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_tls(tmp_path: Path) -> None:
    files = self_signed(tmp_path)
    tls = transport.TlsFiles(cert=files.cert, key=files.key)
    async with LocalServices(free_config(tls=tls)) as svc:
        client_tls = transport.TlsFiles(ca_cert=files.cert)
        q = transport.open_channel(svc.queue_address, client_tls)
        n = transport.open_channel(svc.node_cache_address, client_tls)
        plain = transport.open_channel(svc.queue_address)
        try:
            queue = transport.Stub(q, "Queue")
            assert (await queue.CreateSession(SessionInfo(app_id="x"), metadata=md(svc))).id
            node = transport.Stub(n, "Cache")
            await node.SetSharedData(SharedData("s", 1, b"x"), metadata=md(svc))
            assert (await node.GetSharedData(SharedData("s", 1), metadata=md(svc))).payload == b"x"
            code, _ = await code_of(
                transport.Stub(plain, "Queue").CreateSession(
                    SessionInfo(app_id="x"), metadata=md(svc), timeout=5
                )
            )
            assert code == grpc.StatusCode.UNAVAILABLE
        finally:
            for ch in (q, n, plain):
                await ch.close(None)


async def test_mutual_tls(tmp_path: Path) -> None:
    files = self_signed(tmp_path)
    tls = transport.TlsFiles(ca_cert=files.cert, cert=files.cert, key=files.key)
    async with LocalServices(free_config(tls=tls)) as svc:
        good = transport.open_channel(svc.node_cache_address, svc.client_tls())
        anonymous = transport.open_channel(
            svc.node_cache_address, transport.TlsFiles(ca_cert=files.cert)
        )
        try:
            node = transport.Stub(good, "Cache")
            await node.SetSharedData(SharedData("s", 1, b"x"), metadata=md(svc))  # via central
            assert (await node.GetSharedData(SharedData("s", 1), metadata=md(svc))).payload == b"x"
            code, _ = await code_of(
                transport.Stub(anonymous, "Cache").GetSharedData(
                    SharedData("s", 1), metadata=md(svc), timeout=5
                )
            )
            assert code == grpc.StatusCode.UNAVAILABLE
        finally:
            await good.close(None)
            await anonymous.close(None)


async def test_tls_with_a_ca_signed_certificate(tmp_path: Path) -> None:
    ca, leaf = ca_signed(tmp_path)
    tls = transport.TlsFiles(cert=leaf.cert, key=leaf.key)
    async with LocalServices(free_config(tls=tls, tls_ca=ca.cert)) as svc:
        assert svc.client_tls() == transport.TlsFiles(ca_cert=ca.cert)
        channel = transport.open_channel(svc.node_cache_address, svc.client_tls())
        try:
            node = transport.Stub(channel, "Cache")
            await node.SetSharedData(SharedData("s", 1, b"x"), metadata=md(svc))  # via central
            assert (await node.GetSharedData(SharedData("s", 1), metadata=md(svc))).payload == b"x"
        finally:
            await channel.close(None)


def test_cli_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--host",
        "--queue-port",
        "--central-cache-port",
        "--node-cache-port",
        "--proto-package",
        "--api-key",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--tls-ca",
        "--max-deliveries",
        "--max-message-bytes",
        "--unbind-idle-after",
        "--batch-timeout",
        "--log-level",
    ):
        assert flag in out


def test_cli_config() -> None:
    args = build_parser().parse_args(["--queue-port", "0", "--proto-package", ""])
    cfg = config_from_args(args, Env(api_key="from-env"))
    assert (cfg.queue_port, cfg.proto_package, cfg.api_key) == (0, "", "from-env")
    args = build_parser().parse_args(["--api-key", "flag"])
    assert config_from_args(args, Env(api_key="from-env")).api_key == "flag"
    assert main(["--tls-cert", "only-a-cert.pem"]) == EXIT_CONFIG


def test_cli_serves_until_sigterm() -> None:
    env = {k: v for k, v in os.environ.items() if k != "METALCORE_API_KEY"}
    ports = ["--queue-port", "0", "--central-cache-port", "0", "--node-cache-port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray_alpcrun.devserver", *ports, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines: dict[str, str] = {}
        for line in proc.stdout:
            if line.startswith("ready"):
                break
            name, _, value = line.rpartition(" ")
            lines[name.strip()] = value.strip()
        key = lines["generated API key (export METALCORE_API_KEY=...):"]
        with transport.open_sync_channel(lines["queue manager"]) as channel:
            stub = transport.Stub(channel, "Queue")
            assert stub.CreateSession(SessionInfo(app_id="x"), metadata=(("api_key", key),)).id
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()
