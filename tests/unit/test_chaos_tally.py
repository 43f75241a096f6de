"""The chaos run's plan and tally (``tests/support/chaos_plan.py``): the checks
the cluster chaos run relies on must catch what they are there for."""

from __future__ import annotations

from tests.support.chaos_plan import (
    CHEAP,
    HEAVY,
    MINIMUMS,
    Tally,
    Task,
    make_plan,
    payload,
    reason_of,
    task_of,
)


def tally_of(*tasks: tuple[str, int, str, int]) -> Tally:
    t = Tally()
    for tag, index, kind, level in tasks:
        t.send(tag, Task(kind, index, level))
    return t


def test_the_same_seed_draws_the_same_plan_and_every_minimum_is_planned() -> None:
    a, b = make_plan(7), make_plan(7)
    assert a == b and a != make_plan(8)
    planned = {f.kind for f in a.faults}
    assert planned == set(HEAVY) | set(CHEAP)
    for kind in MINIMUMS:  # planned at least as often, or observed (scale-downs)
        if kind in HEAVY:
            assert sum(f.kind == kind for f in a.faults) >= MINIMUMS[kind]
    assert all(0 < f.at < 1 for f in a.faults)
    long = make_plan(7, scale=10)
    assert len(long.faults) > 9 * len(a.faults) and long.tasks == 10 * a.tasks


def test_payloads_name_their_task() -> None:
    for kind in ("ok", "raise", "hang", "exit", "garbage"):
        assert task_of(payload(kind, "s1g2", 345, "/tmp/x", 4)) == ("s1g2", 345)


def test_a_task_answered_with_its_own_payload_and_level_is_a_result() -> None:
    t = tally_of(("s0g0", 0, "ok", 2))
    t.answer("s0g0", 0, b"s0g0/0|s0g0:L2", None, False)
    assert t.outcomes["result"] == 1 and t.lost == 0 and t.doubled == 0 and not t.wrong


def test_an_answer_of_another_task_session_or_level_is_caught() -> None:
    t = tally_of(("s0g0", 0, "ok", 2), ("s0g0", 1, "ok", 2), ("s0g0", 2, "ok", 2))
    t.answer("s0g0", 0, b"s0g0/9|s0g0:L2", None, False)  # another task's
    t.answer("s0g0", 1, b"s0g0/1|s1g0:L2", None, False)  # another session's data
    t.answer("s0g0", 2, b"s0g0/2|s0g0:L1", None, False)  # the level before
    assert len(t.wrong) == 3 and t.outcomes["result"] == 0


def test_lost_doubled_and_unknown_answers_are_counted() -> None:
    t = tally_of(("a", 0, "ok", 1), ("a", 1, "ok", 1))
    t.answer("a", 0, b"a/0|a:L1", None, False)
    t.answer("a", 0, None, "delivered 3 times without an answer", True)
    t.answer("b", 5, b"b/5|b:L1", None, False)
    t.ignored = 2
    assert t.lost == 1 and t.lost_examples() == ["a/1"]
    assert t.doubled == 3
    assert t.wrong == ["answer for a task never sent: ('b', 5)"]


def test_errors_are_told_apart() -> None:
    t = tally_of(("a", 0, "raise", 1), ("a", 1, "hang", 1), ("a", 2, "ok", 1), ("a", 3, "raise", 1))
    t.answer("a", 0, None, "ValueError: asked to raise: a/0", False)
    t.answer("a", 1, None, "task timed out after 0.5 s", False)
    t.answer("a", 2, None, "actor died 3 times: lost", False)
    t.answer("a", 3, None, "ValueError: asked to raise: a/0", False)  # another task's error
    assert t.outcomes["handler error"] == 1 and t.outcomes["timed out (hang)"] == 1
    assert t.outcomes["collateral error"] == 1 and len(t.wrong) == 1
    assert t.faults == {"raising task": 1, "hanging task": 1}


def test_dead_letter_reasons_are_grouped_without_numbers_and_ids() -> None:
    assert reason_of("delivered 3 times without an answer") == "delivered N times without an answer"
    closed = "the session was closed before it ran (closed by the client)"
    assert reason_of(closed) == "the session was closed before it ran"
    assert reason_of(
        "shared data for session 01KBF7YSZBN5Z2R1GJ3AQVW5M6 (level 2) unavailable"
    ) == ("shared data for session S (level N) unavailable")
