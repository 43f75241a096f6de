"""The one builder of answer batches (``ray_alpcrun.answers``): the 5.3 result
rules, and every batch within ``max_message_bytes`` as protobuf encodes it,
changing only what does not fit. No network."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ray_alpcrun import wire
from ray_alpcrun.answers import (
    REASON_KEEP_CHARS,
    answer_bytes_bound,
    dead_batches,
    dead_letters,
    result_batches,
)
from ray_alpcrun.types import Batch, Message

MiB = 1 << 20
LIMIT = 4 * MiB  # the services' default


def _task(n: int, payload: bytes | None = None) -> Batch:
    return Batch(
        id="B1",
        session_id="S1",
        messages=[
            Message(f"t{i}", f"p{i}".encode() if payload is None else payload) for i in range(n)
        ],
    )


def encoded(b: Batch) -> int:
    return len(wire.batch_to_pb(b).SerializeToString())


def answered_once(parts: list[Batch], task: Batch) -> dict[str, Message]:
    """Every task of ``task`` answered exactly once across ``parts``, by id."""
    counts = Counter(m.related_id for p in parts for m in p.messages)
    assert counts == Counter(m.id for m in task.messages)
    return {m.related_id or "": m for p in parts for m in p.messages}


def test_the_measured_size_is_what_protobuf_encodes() -> None:
    rng = random.Random(7)
    texts = ["", "a", "é" * 90, "x" * 300, "\U0001f600" * 40]
    for _ in range(500):
        messages = [
            Message(
                rng.choice(texts),
                bytes(rng.randint(0, 300)) if rng.random() < 0.5 else b"",
                rng.choice([None, "", "r" * rng.randint(1, 200)]),
                rng.choice([None, "", *texts]),
            )
            for _ in range(rng.randint(0, 4))
        ]
        b = Batch(
            rng.choice(["", "b1"]),
            rng.choice(["", "s" * 26]),
            rng.choice([0, 5, 300]),
            messages,
            rng.choice([None, True, False]),
            rng.choice([None, 0, 1, 2**32 - 1]),
            rng.choice([None, True, False]),
        )
        assert wire.batch_bytes(b) == encoded(b)


def test_result_batch_follows_the_result_rules() -> None:
    [out] = result_batches(
        _task(3), [(b"r0", None), (None, "ValueError: bad"), (b"r2", None)], 1 << 20
    )
    assert (out.id, out.session_id, out.dead) == ("B1", "S1", False)
    assert [(m.id, m.related_id) for m in out.messages] == [(f"t{i}", f"t{i}") for i in range(3)]
    assert out.messages[0].payload == b"r0" and out.messages[0].error is None
    assert out.messages[1].payload == b"" and out.messages[1].error == "ValueError: bad"
    [named] = result_batches(_task(1), [(b"r", None)], 1 << 20, session_id="S2")
    assert named.session_id == "S2"


def test_outcome_count_must_match() -> None:
    with pytest.raises(ValueError):
        result_batches(_task(2), [(b"x", None)], 1 << 20)


def test_oversized_results_become_errors_not_drops() -> None:
    outcomes = [(b"x" * 600, None), (b"y" * 10, None), (b"z" * 500, None)]
    [out] = result_batches(_task(3), outcomes, max_message_bytes=1000)
    assert len(out.messages) == 3
    assert out.messages[0].error is not None and "result too large" in out.messages[0].error
    assert out.messages[1].payload == b"y" * 10
    assert encoded(out) <= 1000


def test_dead_batch_answers_every_task() -> None:
    [out] = dead_batches(_task(4), "shared data unavailable", 1 << 20)
    assert out.dead is True
    assert all(m.error == "shared data unavailable" and m.related_id == m.id for m in out.messages)
    assert all(m.payload == b"" for m in out.messages)


def test_a_dead_batch_of_10000_tasks_fits_with_the_first_200_characters() -> None:
    # Issue 18.2 (a): a ~490-character on_session_start error copied onto 10,000
    # messages made a 5.1 MB batch that no stream could carry.
    task = Batch(
        id="01JB" * 6 + "~x",
        session_id="01JS" * 6 + "ab",
        messages=[Message(f"c0ffee12.{i}", b"12345678") for i in range(10_000)],
    )
    reason = "SessionSetupError: on_session_start raised RuntimeError: " + "why " * 110
    assert len(reason) > 450
    parts = dead_batches(task, reason, LIMIT)
    assert len(parts) == 1 and encoded(parts[0]) <= LIMIT
    assert parts[0].dead is True and parts[0].id == task.id
    for m in answered_once(parts, task).values():
        assert m.error is not None and m.error.startswith(reason[:REASON_KEEP_CHARS])
        assert m.error == reason or "trimmed" in m.error


def test_one_huge_error_is_trimmed_and_the_other_answers_kept() -> None:
    # Issue 18.2 (b): the text replacing a result was not counted, so one 4.2 MB
    # error turned all 2,000 answers into "result too large".
    task = _task(2000)
    huge = "ValueError: " + "e" * 4_200_000
    outcomes = [(b"a" * 1024, None)] * 2000
    outcomes[123] = (None, huge)
    [out] = result_batches(task, outcomes, LIMIT)
    assert encoded(out) <= LIMIT
    by_id = answered_once([out], task)
    failed = [tid for tid, m in by_id.items() if m.error is not None]
    assert failed == ["t123"]
    assert by_id["t123"].error is not None
    assert by_id["t123"].error.startswith(huge[:REASON_KEEP_CHARS])
    assert all(m.payload == b"a" * 1024 for tid, m in by_id.items() if tid != "t123")


def test_one_huge_answer_fails_alone() -> None:
    task = _task(2000)
    outcomes: list[tuple[bytes | None, str | None]] = [(b"a" * 1024, None)] * 2000
    outcomes[5] = (b"x" * 4_200_000, None)
    [out] = result_batches(task, outcomes, LIMIT)
    assert encoded(out) <= LIMIT
    by_id = answered_once([out], task)
    assert [tid for tid, m in by_id.items() if m.error is not None] == ["t5"]
    assert "result too large: 4200000 bytes" in (by_id["t5"].error or "")
    assert by_id["t5"].payload == b""


def test_answers_whose_ids_alone_overflow_are_split() -> None:
    # The last resort: nothing left to trim or drop, yet ids twice do not fit.
    task = Batch(id="B", messages=[Message(f"t{i:07d}") for i in range(3000)])
    parts = dead_batches(task, "gone", 40_000)
    assert len(parts) > 1
    assert all(encoded(p) <= 40_000 and p.id == "B" and p.dead for p in parts)
    assert all(m.error == "gone" for m in answered_once(parts, task).values())


def test_dead_letters_keep_their_payloads_and_split_to_fit() -> None:
    limit = 64 * 1024
    task = Batch(
        id="B~internal",
        session_id="S",
        priority=7,
        use_shared_data=True,
        required_shared_data_update_level=3,
        messages=[Message(f"t{i}", bytes([i % 251]) * 1000) for i in range(200)],
    )
    errors = {"t3": "ValueError: worker said " + "w" * 900}
    parts = dead_letters(task, "delivered 3 times without an answer", limit, errors, batch_id="B")
    assert len(parts) > 1
    for p in parts:
        assert encoded(p) <= limit
        assert (p.id, p.session_id, p.priority, p.dead) == ("B", "S", 7, True)
        assert (p.use_shared_data, p.required_shared_data_update_level) == (True, 3)
    by_id = answered_once(parts, task)
    for t in task.messages:
        assert by_id[t.id].payload == t.payload  # nothing trimmed: splitting was enough
    assert by_id["t3"].error == errors["t3"]
    assert by_id["t0"].error == "delivered 3 times without an answer"


def test_a_dead_letter_that_cannot_fit_alone_leaves_out_only_its_payload() -> None:
    limit = 10_000
    task = Batch(id="B", messages=[Message("small", b"s" * 10), Message("big", b"b" * 9_990)])
    parts = dead_letters(task, "why " * 100, limit)
    assert all(encoded(p) <= limit for p in parts)
    by_id = answered_once(parts, task)
    assert by_id["small"].payload == b"s" * 10
    assert by_id["big"].payload == b""
    big_error = by_id["big"].error or ""
    assert big_error.startswith(("why " * 100)[:REASON_KEEP_CHARS])
    assert "payload of 9990 bytes is left out" in big_error


def test_tasks_within_the_answer_bound_are_answered_in_one_batch() -> None:
    # What the client relies on when it caps the tasks per batch: whatever the
    # errors (here 4-byte characters), the answers fit in one batch.
    ids = [f"c0ffee12.{i}" for i in range(100_000, 102_000)]
    room = 300_000
    n = room // answer_bytes_bound(ids[-1])
    task = Batch(id="B", session_id="S" * 26, messages=[Message(i, b"p") for i in ids[:n]])
    outcomes: list[tuple[bytes | None, str | None]] = [(None, "\U0001f600" * 5000)] * n
    head = wire.batch_header_bytes(Batch(id="B", session_id="S" * 26, dead=False))
    parts = result_batches(task, outcomes, room + head)
    assert len(parts) == 1 and encoded(parts[0]) <= room + head
    answered_once(parts, task)
