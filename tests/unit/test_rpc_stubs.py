"""The typed stubs and handler protocols come from the same table as the codecs."""

from __future__ import annotations

import pytest

from ray_alpcrun import rpc
from ray_alpcrun.wire import METHODS


def test_stubs_declare_every_rpc_of_the_table_with_its_types() -> None:
    for cls in (rpc.QueueStub, rpc.CacheStub):
        table = {
            s.name: (s.cardinality, s.request.__name__, s.response.__name__)
            for s in METHODS.values()
            if s.service == cls.SERVICE
        }
        assert rpc.declared(cls) == table
    assert rpc.declared(rpc.QueueStub)["WorkerUpdate"] == (
        "stream_stream",
        "WorkerState",
        "Instruction",
    )


def test_a_declaration_that_drifts_from_the_proto_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong = dict(
        rpc.CacheStub.__annotations__, GetSharedData="UnaryUnaryMethod[SharedData, Status]"
    )
    monkeypatch.setattr(rpc.CacheStub, "__annotations__", wrong)
    with pytest.raises(AssertionError, match="CacheStub does not match"):
        rpc._check_against_the_table()


def test_stub_by_name_and_unknown_service() -> None:
    import grpc.aio

    async def make() -> None:
        channel = grpc.aio.insecure_channel("127.0.0.1:9")
        try:
            assert isinstance(rpc.Stub(channel, "Queue"), rpc.QueueStub)
            assert isinstance(rpc.Stub(channel, "Cache", ""), rpc.CacheStub)
            with pytest.raises(ValueError, match="no such service"):
                rpc.Stub(channel, "Nope")  # type: ignore[call-overload]
        finally:
            await channel.close()

    import asyncio

    asyncio.run(make())
