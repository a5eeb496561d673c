"""The order in which a trainer sees curriculum rows.

In:  difficulties of the curriculum rows, in the shards' order (easy -> hard).
Out: a list of row indices, one per example the trainer will see, epochs included. The
     trainer feeds them through a sequential sampler, so this list *is* the training order.

Strategies:
    sorted    strict easy -> hard, every epoch, no shuffling.
    shuffled  a fresh random permutation per epoch: the baseline a curriculum must beat.
    staged    ordered stages, each a difficulty range seen for some epochs (Light-R1: first
              everything, then the hard subset); within a stage rows stay easy -> hard unless
              the stage says shuffle.
    pacing    competence-based (Platanios et al., 2019): at training progress p the batch is
              drawn from the easiest c(p) share of the rows, where c grows from
              `initial_competence` to 1 (sqrt: c = sqrt(p(1 - c0^2) + c0^2); linear: c0 + p(1 - c0)).
    replay    easy -> hard by buckets with replay of the earlier ones: the rows are cut into
              `buckets` equal slices of the curriculum order; each epoch walks them easy -> hard,
              and each phase holds its bucket's rows plus `replay` times as many rows redrawn
              from the earlier buckets (shuffled together), so what was learnt first keeps
              coming back (the rehearsal of continual learning) while the course still climbs.
              Replayed rows are extra examples: an epoch is n + replay x (rows after bucket 0).
    hard_weighted  each row seen in proportion to 1 + hard_weight x difficulty, in random order
              (s1 / LIMO: the hard problems carry the signal): the same number of examples as
              shuffled (n per epoch), more of them on hard rows and fewer on easy ones; a row's
              count is its expected count rounded by systematic sampling, so the counts are
              exact, not a noisy draw.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

STRATEGIES = ("sorted", "shuffled", "staged", "pacing", "replay", "hard_weighted")


@dataclass
class Stage:
    min_difficulty: float = 0.0
    """Rows with difficulty >= this are in the stage."""
    max_difficulty: float = 1.0
    """... and difficulty <= this."""
    epochs: int = 1
    """Passes over the stage's rows."""
    shuffle: bool = False
    """Shuffle within the stage (each pass); otherwise easy -> hard."""


@dataclass
class OrderConfig:
    strategy: str = "sorted"
    """sorted | shuffled | staged | pacing | replay | hard_weighted (see factory.training.curriculum)."""
    epochs: int | float = 1
    """Passes over the data for sorted, shuffled, pacing, replay and hard_weighted (staged sets
    epochs per stage). Whole passes, except for shuffled: 2.375 is two passes and the first 37.5%
    of a third (so shuffled can match another order's example count, e.g. replay's)."""
    stages: list[Stage] = field(default_factory=lambda: [Stage(), Stage(min_difficulty=0.5)])
    """strategy=staged: the stages in order (default: everything, then the harder half)."""
    pacing: str = "sqrt"
    """strategy=pacing: competence curve, sqrt | linear."""
    initial_competence: float = 0.2
    """strategy=pacing: share of the (easiest) rows available at the first step."""
    buckets: int = 4
    """strategy=replay: equal slices of the curriculum order, walked easy -> hard."""
    replay: float = 0.25
    """strategy=replay: rows redrawn from the earlier buckets per row of the current one."""
    hard_weight: float = 1.0
    """strategy=hard_weighted: a row's weight is 1 + hard_weight x difficulty (0: shuffled's counts;
    1: a difficulty-1 row is seen twice as often as a difficulty-0 one)."""
    seed: int = 0
    """Seed of shuffling and of pacing's, replay's and hard_weighted's draws."""
    group_by_length: int = 0
    """Regroup each window of this many optimizer steps by length: the window's rows sorted by
    length, cut into micro-batches, the batches shuffled. Padding drops (a random batch of the
    demo's rows is 57% real tokens) while the order keeps its course at the window's grain.
    0: off."""


def competence(progress: float, c0: float, curve: str) -> float:
    """Share of the easiest rows available at training progress 0 <= progress <= 1."""
    progress = min(max(progress, 0.0), 1.0)
    if curve == "sqrt":
        return min(1.0, math.sqrt(progress * (1 - c0 * c0) + c0 * c0))
    if curve == "linear":
        return min(1.0, c0 + progress * (1 - c0))
    raise ValueError(f"pacing={curve!r}; use sqrt or linear")


def check(cfg: OrderConfig) -> None:
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"strategy={cfg.strategy!r}; use one of {', '.join(STRATEGIES)}")
    if cfg.epochs < 1:
        raise ValueError(f"epochs={cfg.epochs}; must be >= 1")
    if cfg.epochs != int(cfg.epochs) and cfg.strategy != "shuffled":
        raise ValueError(f"epochs={cfg.epochs}; strategy={cfg.strategy} takes whole passes (only shuffled "
                         "takes a fraction of one)")
    if cfg.strategy == "staged" and not cfg.stages:
        raise ValueError("strategy=staged needs at least one stage")
    if cfg.strategy == "pacing":
        competence(0.0, cfg.initial_competence, cfg.pacing)
        if not 0.0 < cfg.initial_competence <= 1.0:
            raise ValueError(f"initial_competence={cfg.initial_competence}; must be in (0, 1]")
    if cfg.strategy == "replay" and (cfg.buckets < 1 or cfg.replay < 0):
        raise ValueError(f"buckets={cfg.buckets}, replay={cfg.replay}; replay needs buckets >= 1 and replay >= 0")
    if cfg.strategy == "hard_weighted" and cfg.hard_weight < 0:
        raise ValueError(f"hard_weight={cfg.hard_weight}; must be >= 0 (0 is shuffled)")
    if cfg.group_by_length < 0:
        raise ValueError(f"group_by_length={cfg.group_by_length}; use 0 (off) or a number of steps")


def pacing_limits(n_rows: int, n_steps: int, batch_size: int, cfg: OrderConfig) -> list[int]:
    """For each step, how many of the easiest rows it may draw from (at least one batch)."""
    out = []
    for t in range(n_steps):
        c = competence(t / max(1, n_steps - 1), cfg.initial_competence, cfg.pacing)
        out.append(min(n_rows, max(batch_size, math.ceil(c * n_rows))))
    return out


def group_by_length(order: list[int], lengths: list[int], micro_batch: int, window: int, seed: int) -> list[int]:
    """`order` with each `window` consecutive examples regrouped into micro-batches of similar
    length (shuffled within the window); a short last batch stays last, so every other batch
    keeps its boundaries. Same examples, same count."""
    rng = random.Random(f"{seed}:lengths")
    out: list[int] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start: start + window], key=lambda i: (lengths[i], i))
        batches = [chunk[j: j + micro_batch] for j in range(0, len(chunk), micro_batch)]
        tail = [batches.pop()] if len(batches[-1]) < micro_batch else []
        rng.shuffle(batches)
        out += [i for b in batches + tail for i in b]
    return out


def training_order(difficulty: list[float], cfg: OrderConfig, batch_size: int, lengths: list[int] | None = None,
                   micro_batch: int | None = None) -> list[int]:
    """Row indices in the order the trainer sees them, regrouped by length when
    cfg.group_by_length (needs `lengths` and the per-device `micro_batch`)."""
    order = _order(difficulty, cfg, batch_size)
    if cfg.group_by_length > 0:
        if lengths is None:
            raise ValueError("order.group_by_length needs the rows' lengths")
        order = group_by_length(order, lengths, micro_batch or batch_size, cfg.group_by_length * batch_size, cfg.seed)
    return order


def _order(difficulty: list[float], cfg: OrderConfig, batch_size: int) -> list[int]:
    """Row indices in the order the trainer sees them.

    Args:
        difficulty: per row, in curriculum order (non-decreasing).
        batch_size: examples per optimizer step (per-device batch x accumulation x devices);
            pacing draws whole steps at once.
    """
    check(cfg)
    n = len(difficulty)
    rng = random.Random(cfg.seed)
    rows = list(range(n))
    passes = int(cfg.epochs)
    if cfg.strategy == "sorted":
        return rows * passes
    if cfg.strategy == "shuffled":  # a fraction of a pass: the start of one more permutation
        part = round((cfg.epochs - passes) * n)
        return [i for _ in range(passes) for i in rng.sample(rows, n)] + (rng.sample(rows, n)[:part] if part else [])
    if cfg.strategy == "staged":
        order = []
        for s in cfg.stages:
            members = [i for i in rows if s.min_difficulty <= difficulty[i] <= s.max_difficulty]
            for _ in range(s.epochs):
                order += rng.sample(members, len(members)) if s.shuffle else members
        return order
    if cfg.strategy == "replay":
        return _replay(n, cfg, rng)
    if cfg.strategy == "hard_weighted":
        return _hard_weighted(difficulty, cfg, rng)
    # pacing: as many examples as `epochs` passes, each step drawn from the allowed prefix
    total = n * passes
    n_steps = max(1, math.ceil(total / batch_size))
    order = []
    for t, limit in enumerate(pacing_limits(n, n_steps, batch_size, cfg)):
        size = min(batch_size, total - len(order))
        order += sorted(rng.sample(range(limit), min(size, limit)))
    return order


def bucket_bounds(n: int, buckets: int) -> list[tuple[int, int]]:
    """[start, end) of `buckets` near-equal slices of n rows in curriculum order (empty ones left out)."""
    edges = [round(b * n / buckets) for b in range(buckets + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _replay(n: int, cfg: OrderConfig, rng: random.Random) -> list[int]:
    order = []
    for _ in range(int(cfg.epochs)):
        for start, end in bucket_bounds(n, cfg.buckets):
            phase = list(range(start, end))
            k = min(start, round(cfg.replay * (end - start)))  # without repeats within a phase
            phase += rng.sample(range(start), k)
            rng.shuffle(phase)
            order += phase
    return order


def hard_counts(difficulty: list[float], cfg: OrderConfig, rng: random.Random) -> list[int]:
    """Examples per row for hard_weighted: n x epochs in all, row i's share proportional to
    1 + hard_weight x difficulty[i], rounded by systematic sampling (each count is the floor or
    the ceiling of the expected count, and they sum to the total)."""
    weights = [1.0 + cfg.hard_weight * d for d in difficulty]
    total, mass = len(difficulty) * int(cfg.epochs), sum(weights)
    counts, cum, prev, u = [], 0.0, 0, rng.random()
    for i, w in enumerate(weights):
        cum += w
        edge = total if i == len(weights) - 1 else math.floor(total * cum / mass + u)  # the last edge exact
        counts.append(edge - prev)
        prev = edge
    return counts


def _hard_weighted(difficulty: list[float], cfg: OrderConfig, rng: random.Random) -> list[int]:
    order = [i for i, c in enumerate(hard_counts(difficulty, cfg, rng)) for _ in range(c)]
    rng.shuffle(order)
    return order
