"""How a batch is split over actors with loads: a pure function, no asyncio."""

from __future__ import annotations

from collections.abc import Sequence


def plan_chunks(loads: Sequence[int], n: int, min_chunk: int) -> list[tuple[int, int]]:
    """Split ``n`` tasks over actors with in-flight ``loads``: ``[(actor index, count)]``.

    At most ``n // min_chunk`` chunks (at least one): for cheap tasks a Ray call
    costs more than the tasks, so small batches stay whole. Within that, the
    least-loaded actors are filled so their loads even out (water-filling), and
    a chunk below ``min_chunk`` is folded into the others.
    """
    if n <= 0 or not loads:
        return []
    k = max(1, min(len(loads), n // min_chunk))
    order = sorted(range(len(loads)), key=loads.__getitem__)[:k]
    while True:
        base = [loads[i] for i in order]
        m = len(order)
        # Water level: largest m whose most loaded member still sits below it.
        while m > 1 and (n + sum(base[:m])) <= base[m - 1] * m:
            m -= 1
        level, rest = divmod(n + sum(base[:m]), m)
        counts = [level - base[i] for i in range(m)]
        for i in range(rest):
            counts[i] += 1
        plan = [(order[i], c) for i, c in enumerate(counts) if c > 0]
        if len(plan) == 1 or min(c for _, c in plan) >= min_chunk:
            return plan
        order = [i for i, _ in plan][:-1]
