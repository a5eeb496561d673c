"""Dedup stage throughput: exact + MinHash LSH near-duplicate removal over N questions.

    python benchmarks/dedup_throughput.py [--questions 100000] [--dup-share 0.1]

The questions are synthetic word problems (40 templates over a 2,000-word vocabulary, 30-70
words, random numbers), with a share of planted duplicates: exact copies with other case and
spacing, and copies with one or two words changed. Prints the time of each part, the rows per
second, and how many planted duplicates were found (and how many rows were removed that were
not planted, which should be 0).
"""

from __future__ import annotations

import argparse
import random
import time

from factory import schema
from factory.stages.dedup import DedupConfig, dedup_table


def make_questions(n: int, dup_share: float, seed: int = 0) -> tuple[list[dict], set[int]]:
    rng = random.Random(seed)
    vocab = [f"w{rng.randrange(10**6):06d}" for _ in range(2000)]
    templates = [[rng.choice(vocab) for _ in range(rng.randint(30, 70))] for _ in range(40)]
    rows, planted = [], set()
    n_unique = int(n * (1 - dup_share))
    for i in range(n_unique):
        words = list(rng.choice(templates))
        for _ in range(rng.randint(2, 6)):  # each question differs from its template in words ...
            words[rng.randrange(len(words))] = rng.choice(vocab)
        for _ in range(rng.randint(2, 4)):  # ... and in its numbers
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 10**6)))
        rows.append(" ".join(words) + "?")
    for _ in range(n - n_unique):
        src = rows[rng.randrange(n_unique)]
        planted.add(len(rows))
        if rng.random() < 0.5:
            rows.append("  " + src.upper().replace(" ", "   ", 3) + " ")
        else:
            words = src.split(" ")
            k = rng.choice([i for i, w in enumerate(words) if not w.isdigit()])
            words[k] = rng.choice(vocab)  # one word changed, numbers kept
            rows.append(" ".join(words))
    table_rows = [{"problem_id": f"q{i}", "question": q, "answer": "0", "domain": "numeric", "split": "train",
                   "origin": "original"} for i, q in enumerate(rows)]
    return table_rows, planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=100_000)
    ap.add_argument("--dup-share", type=float, default=0.1)
    args = ap.parse_args()
    rows, planted = make_questions(args.questions, args.dup_share)
    table = schema.table(rows, schema.PROBLEMS)
    t0 = time.perf_counter()
    kept, rejected, stats = dedup_table(table, DedupConfig())
    seconds = time.perf_counter() - t0
    removed = {int(p[1:]) for p in rejected.column("problem_id").to_pylist()}
    print(f"{args.questions} questions, {len(planted)} planted duplicates")
    print(f"dedup: {seconds:.1f} s ({args.questions / seconds:,.0f} questions/s)")
    print(f"removed {rejected.num_rows}: exact {stats['duplicates']['duplicate_exact']}, near {stats['duplicates']['near_duplicate']}")
    print(f"planted found {len(planted & removed)}/{len(planted)}; removed but not planted {len(removed - planted)}")


if __name__ == "__main__":
    main()
