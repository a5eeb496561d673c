"""prm.windows: every step scored once, in the window giving it the most preceding context,
windows within the room, tokens read within the factor."""

from __future__ import annotations

import random

import pytest

from prm.windows import Window, greedy, least_context, plan_windows, tokens_read


def check_plan(plan: list[Window], lengths: list[int], room: int) -> None:
    assert plan[0].start == plan[0].scored == 0 and plan[-1].end == len(lengths)
    for w, nxt in zip(plan, plan[1:]):
        assert nxt.scored == w.end  # every step scored exactly once, in order
    for w in plan:
        assert w.start <= w.scored < w.end and sum(lengths[w.start: w.end]) <= room
    for k, w in enumerate(plan):  # no other window holding a step it scores starts earlier
        for other in plan[k + 1:]:
            if other.start < w.end:
                assert other.start >= w.start


@pytest.mark.parametrize("seed", range(20))
def test_plans_on_random_traces(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([3, 8, 12, 40, 90]) for _ in range(rng.randint(20, 300))]
    room, prompt = rng.choice([200, 400, 1000]), rng.choice([20, 80])
    plan = plan_windows(lengths, room, prompt, 1.5)
    check_plan(plan, lengths, room)
    total = prompt + sum(lengths)
    no_context = greedy(lengths, room, 0)
    assert tokens_read(plan, lengths, prompt) <= max(1.5 * total, tokens_read(no_context, lengths, prompt))
    least = least_context(plan, lengths)
    assert least is None or least >= 0
    check_plan(plan_windows(lengths, room, prompt, 3.0), lengths, room)


def test_the_context_is_the_most_the_budget_allows():
    lengths = [10] * 100  # 1000 tokens of steps, a 20-token prompt, 300 tokens of room
    plan = plan_windows(lengths, 300, 20, 1.5)
    read = tokens_read(plan, lengths, 20)
    assert read <= 1.5 * 1020
    assert least_context(plan, lengths) >= 100  # a third of the window or so
    more = greedy(lengths, 300, least_context(plan, lengths) + 10)
    assert tokens_read(more, lengths, 20) > 1.5 * 1020  # any more context would read past the budget


def test_a_trace_that_fits_in_two_windows_keeps_most_of_its_context():
    lengths = [10] * 35  # 350 tokens in a room of 300: just over
    plan = plan_windows(lengths, 300, 20, 1.5)
    assert len(plan) == 2 and least_context(plan, lengths) >= 150


def test_a_step_longer_than_the_room_cannot_be_planned():
    assert plan_windows([10, 500, 10], 300, 20, 1.5) is None
    assert greedy([300], 300, 0) == [Window(0, 0, 1)]  # exactly the room fits


def test_a_window_that_does_not_fit_as_encoded_gives_up_steps():
    lengths = [10] * 40
    plan = greedy(lengths, 100, 30, fits=lambda a, b: b - a <= 6)  # each window really holds 6 steps
    check_plan(plan, lengths, 100)
    assert all(w.end - w.start <= 6 for w in plan)
    assert greedy(lengths, 100, 0, fits=lambda a, b: False) is None


def test_a_long_prompt_gets_windows_without_context():
    lengths = [10] * 50
    plan = plan_windows(lengths, 60, 500, 1.5)  # five windows repeat a 500-token prompt: over any budget
    check_plan(plan, lengths, 60)
    assert plan == greedy(lengths, 60, 0) and least_context(plan, lengths) == 0  # steps scored with no context
