"""Training orders: what each strategy feeds the trainer, on an inline difficulty list."""

import math

import pytest

from factory.training.curriculum import OrderConfig, Stage, competence, pacing_limits, training_order

# 40 rows in curriculum order: difficulty 0, 0.125, ... non-decreasing
DIFF = sorted([(i % 9) / 8 for i in range(40)])


def test_sorted_is_curriculum_order_every_epoch():
    assert training_order(DIFF, OrderConfig("sorted", epochs=2), 8) == list(range(40)) * 2


def test_shuffled_is_a_permutation_per_epoch_and_seeded():
    order = training_order(DIFF, OrderConfig("shuffled", epochs=2, seed=1), 8)
    assert sorted(order[:40]) == list(range(40)) and sorted(order[40:]) == list(range(40))
    assert order[:40] != list(range(40)) and order[:40] != order[40:]
    assert order == training_order(DIFF, OrderConfig("shuffled", epochs=2, seed=1), 8)
    assert order != training_order(DIFF, OrderConfig("shuffled", epochs=2, seed=2), 8)


def test_shuffled_takes_a_fraction_of_a_pass_as_the_start_of_one_more():
    whole = training_order(DIFF, OrderConfig("shuffled", epochs=3, seed=1), 8)
    part = training_order(DIFF, OrderConfig("shuffled", epochs=2.375, seed=1), 8)
    assert len(part) == 80 + 15 and part == whole[:95]  # 2 passes + 37.5% of 40 rows
    assert len(set(part[80:])) == 15  # no row twice within the partial pass


def test_staged_everything_then_the_hard_subset():
    cfg = OrderConfig("staged", stages=[Stage(0.0, 1.0, 1), Stage(0.5, 1.0, 2)])
    hard = [i for i, d in enumerate(DIFF) if d >= 0.5]
    assert training_order(DIFF, cfg, 8) == list(range(40)) + hard + hard
    shuffled = training_order(DIFF, OrderConfig("staged", stages=[Stage(0.5, 1.0, 1, shuffle=True)]), 8)
    assert sorted(shuffled) == hard and shuffled != hard


@pytest.mark.parametrize("curve", ["sqrt", "linear"])
def test_pacing_widens_from_the_easy_end(curve):
    cfg = OrderConfig("pacing", epochs=2, pacing=curve, initial_competence=0.25)
    order = training_order(DIFF, cfg, 8)
    assert len(order) == 80
    steps = [order[i:i + 8] for i in range(0, 80, 8)]
    limits = pacing_limits(40, len(steps), 8, cfg)
    assert limits[0] == 10 and limits[-1] == 40 and limits == sorted(limits)
    for step, limit in zip(steps, limits):
        assert len(set(step)) == len(step) and max(step) < limit  # only the easiest `limit` rows
    mean = lambda s: sum(DIFF[i] for i in s) / len(s)
    assert mean(steps[0]) < mean(steps[-1])


def test_competence_curves():
    assert competence(0, 0.04, "sqrt") == pytest.approx(0.04)
    assert competence(1, 0.04, "sqrt") == 1.0
    assert competence(0.5, 0.0, "sqrt") == pytest.approx(math.sqrt(0.5))
    assert competence(0.5, 0.2, "linear") == pytest.approx(0.6)


def test_group_by_length_regroups_within_windows_and_keeps_the_rows():
    lengths = [(i * 37) % 50 + 5 for i in range(40)]  # lengths unrelated to difficulty
    plain = training_order(DIFF, OrderConfig("sorted", epochs=2), 8)
    order = training_order(DIFF, OrderConfig("sorted", epochs=2, group_by_length=2), 8, lengths=lengths, micro_batch=4)
    assert sorted(order) == sorted(plain) and order != plain
    for w in range(0, 80, 16):  # a window of 2 steps holds the same rows as before, so the course keeps its grain
        assert sorted(order[w:w + 16]) == sorted(plain[w:w + 16])
    spread = lambda o: sum(max(lengths[i] for i in o[j:j + 4]) - min(lengths[i] for i in o[j:j + 4])
                           for j in range(0, 80, 4))
    assert spread(order) < spread(plain) / 3  # micro-batches of similar length: little padding
    assert order == training_order(DIFF, OrderConfig("sorted", epochs=2, group_by_length=2), 8,
                                   lengths=lengths, micro_batch=4)
    # a window that is not a whole number of micro-batches keeps its short batch last
    odd = training_order(DIFF[:10], OrderConfig("sorted", group_by_length=1), 8, lengths=lengths[:10], micro_batch=3)
    assert sorted(odd[:8]) == list(range(8)) and len(odd) == 10 and sorted(odd[8:]) == [8, 9]
    with pytest.raises(ValueError, match="lengths"):
        training_order(DIFF, OrderConfig("sorted", group_by_length=2), 8)


@pytest.mark.parametrize("cfg,message", [
    (OrderConfig("random"), "strategy='random'"),
    (OrderConfig("pacing", pacing="cubic"), "pacing='cubic'"),
    (OrderConfig("staged", stages=[]), "at least one stage"),
    (OrderConfig("sorted", epochs=0), "epochs=0"),
    (OrderConfig("replay", epochs=2.5), "takes whole passes"),
    (OrderConfig("sorted", group_by_length=-1), "group_by_length=-1"),
])
def test_bad_orders_are_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        training_order(DIFF, cfg, 8)


def test_replay_climbs_bucket_by_bucket_and_replays_earlier_ones():
    cfg = OrderConfig("replay", epochs=2, buckets=4, replay=0.5, seed=3)
    order = training_order(DIFF, cfg, 8)
    # 4 buckets of 10 rows; phase b holds its 10 rows + 5 replayed from rows < 10b (none for bucket 0)
    sizes = [10, 15, 15, 15]
    assert len(order) == 2 * sum(sizes)
    pos = 0
    for _ in range(2):
        for b, size in enumerate(sizes):
            phase = order[pos:pos + size]
            pos += size
            own = sorted(i for i in phase if 10 * b <= i < 10 * (b + 1))
            replayed = [i for i in phase if i < 10 * b]
            assert own == list(range(10 * b, 10 * b + 10))  # every row of the bucket, once
            assert len(replayed) == size - 10 and len(set(replayed)) == len(replayed)  # only earlier rows
            assert not any(i >= 10 * (b + 1) for i in phase)  # nothing from harder buckets yet
    assert order[10:25] != sorted(order[10:25])  # shuffled within the phase
    assert order == training_order(DIFF, cfg, 8)
    # replay 0 is sorted by buckets: each bucket's rows, shuffled inside it
    plain = training_order(DIFF, OrderConfig("replay", buckets=4, replay=0.0), 8)
    assert [sorted(plain[i:i + 10]) for i in range(0, 40, 10)] == [list(range(i, i + 10)) for i in range(0, 40, 10)]


def test_hard_weighted_sees_hard_rows_more_often_with_the_same_number_of_examples():
    from collections import Counter

    cfg = OrderConfig("hard_weighted", epochs=2, hard_weight=1.0, seed=5)
    order = training_order(DIFF, cfg, 8)
    assert len(order) == 80  # as many examples as shuffled
    counts = Counter(order)
    # expected count of row i: 80 (1 + d_i) / sum(1 + d): each count is its floor or ceiling
    mass = sum(1 + d for d in DIFF)
    for i, d in enumerate(DIFF):
        assert abs(counts.get(i, 0) - 80 * (1 + d) / mass) < 1
    easy = sum(counts.get(i, 0) for i, d in enumerate(DIFF) if d == 0) / DIFF.count(0)
    hard = sum(counts.get(i, 0) for i, d in enumerate(DIFF) if d == 1) / DIFF.count(1)
    assert hard == pytest.approx(2 * easy, rel=0.35)  # weight 2 vs 1
    assert order != sorted(order) and order == training_order(DIFF, cfg, 8)
    # weight 0 gives every row exactly `epochs` examples (shuffled's counts)
    flat = training_order(DIFF, OrderConfig("hard_weighted", epochs=2, hard_weight=0.0), 8)
    assert Counter(flat) == Counter(list(range(40)) * 2)


def test_bad_replay_and_hard_weight_are_errors():
    with pytest.raises(ValueError, match="buckets=0"):
        training_order(DIFF, OrderConfig("replay", buckets=0), 8)
    with pytest.raises(ValueError, match="hard_weight=-1"):
        training_order(DIFF, OrderConfig("hard_weighted", hard_weight=-1), 8)
