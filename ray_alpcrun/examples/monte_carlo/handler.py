"""The Monte Carlo example as a ray_alpcrun handler.

Run it behind the bridge with
``--handler ray_alpcrun.examples.monte_carlo.handler:MonteCarloHandler``.
The session's shared data is the market (:func:`~.pricing.encode_market`), decoded
once per actor and update level, and moved to the GPU by a GPU actor; each task
is a :class:`~.pricing.PricingTask`. A whole sub-batch is priced by one
:func:`~.engine.price_tasks` call: all its contracts stacked into the same arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ray_alpcrun.examples.monte_carlo.engine import (
    DEFAULT_MAX_CHUNK_BYTES,
    make_simulator,
    price_tasks,
)
from ray_alpcrun.examples.monte_carlo.pricing import (
    MarketData,
    PricingTask,
    decode_market,
    decode_task,
    encode_result,
)
from ray_alpcrun.handler import Handler, SessionContext

log = logging.getLogger(__name__)


class MonteCarloHandler(Handler):
    """Prices European and arithmetic-Asian options; NumPy on CPU actors, CuPy on GPU actors.

    ``engine`` is ``"auto"`` (the fused CUDA kernel on a GPU, array code on a CPU),
    ``"xp"`` (array code everywhere) or ``"cuda"``. ``chunk_paths`` fixes how many
    paths are simulated at once (default: per device); fix it to reproduce runs.
    """

    def __init__(
        self,
        *,
        engine: str = "auto",
        chunk_paths: int | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> None:
        self.engine = engine
        self.chunk_paths = chunk_paths
        self.max_chunk_bytes = max_chunk_bytes
        self._simulators: dict[int, Any] = {}

    def __repr__(self) -> str:
        return f"MonteCarloHandler(engine={self.engine!r}, chunk_paths={self.chunk_paths})"

    def __getstate__(self) -> dict[str, Any]:
        # Compiled kernels stay behind: each actor builds its own.
        state = self.__dict__.copy()
        state["_simulators"] = {}
        return state

    def decode_shared(self, payload: bytes) -> MarketData:
        return decode_market(payload)

    def on_session_start(self, session: SessionContext) -> None:
        if not isinstance(session.shared, MarketData):
            raise ValueError(
                "the Monte Carlo handler needs market data as the session's shared data"
            )

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        (outcome,) = self._price([payload], session)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def process_batch(
        self, payloads: Sequence[bytes], session: SessionContext
    ) -> list[bytes | BaseException]:
        """Price a whole sub-batch in one vectorised pass; a malformed task fails alone."""
        return self._price(payloads, session)

    def _price(
        self, payloads: Sequence[bytes], session: SessionContext
    ) -> list[bytes | BaseException]:
        market = session.shared
        if not isinstance(market, MarketData):
            raise ValueError("no market data for this session")
        xp = session.xp if session.xp is not None else np
        outcomes: list[bytes | BaseException] = []
        tasks: list[PricingTask] = []
        where: list[int] = []
        for i, payload in enumerate(payloads):
            try:
                task = decode_task(payload)
                task.validate(market.n)
            except Exception as exc:
                outcomes.append(exc)
                continue
            outcomes.append(b"")
            tasks.append(task)
            where.append(i)
        if tasks:
            results = price_tasks(
                xp,
                market,
                tasks,
                chunk_paths=self.chunk_paths,
                max_chunk_bytes=self.max_chunk_bytes,
                engine=self._simulator(xp),
            )
            for i, result in zip(where, results, strict=True):
                outcomes[i] = encode_result(result)
        return outcomes

    def _simulator(self, xp: Any) -> Any:
        sim = self._simulators.get(id(xp))
        if sim is None:
            sim = make_simulator(xp, self.engine)
            log.info(
                "Monte Carlo handler simulating with the %r engine on %s", sim.name, xp.__name__
            )
            self._simulators[id(xp)] = sim
        return sim
