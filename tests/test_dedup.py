"""Dedup: planted duplicates go, near-misses with other numbers stay, held-out copies win."""

from __future__ import annotations

import json

from factory import schema
from factory.stages.dedup import DedupConfig, dedup_table, exact_key, numbers, shingles

BASE = ("A farmer has 12 cows and buys 7 more at the market on Monday. Each cow gives 3 litres of milk "
        "a day. How many litres of milk do all the cows give in one day?")


def problems(questions: list[str], **cols) -> "schema.pa.Table":
    rows = [{"problem_id": f"p{i}", "question": q, "answer": "57", "domain": "numeric", "split": "train",
             "origin": "original", **{k: v[i] for k, v in cols.items()}} for i, q in enumerate(questions)]
    return schema.table(rows, schema.PROBLEMS)


def removed(rejected) -> dict[str, tuple[str, str]]:
    return {r["problem_id"]: (r["drop_reason"], json.loads(r["record"])["duplicate_of"]) for r in rejected.to_pylist()}


def test_planted_duplicates_removed_and_near_misses_kept():
    questions = [
        BASE,                                                                     # p0 kept
        "  " + BASE.upper().replace(" ", "\t ", 5) + "\n",                        # p1 exact: case + whitespace
        BASE.replace("cows and buys", "cows, then buys"),                         # p2 near: a word changed
        BASE.replace("on Monday", "on Tuesday").replace("all the cows", "the cows"),  # p3 near: two edits
        BASE.replace("12 cows", "15 cows").replace("7 more", "4 more"),           # p4 same template, other numbers
        BASE.replace("3 litres", "5 litres"),                                     # p5 one number changed
        "What is 3 + 4?",                                                         # p6 kept
        "what is 3+4 ?",                                                          # p7 exact: spacing and case
        "What is 4 + 3?",                                                         # p8 other order: a near-miss
        "Completely different: how many primes are below 20?",                    # p9 kept
    ]
    kept, rejected, stats = dedup_table(problems(questions), DedupConfig())
    assert kept.column("problem_id").to_pylist() == ["p0", "p4", "p5", "p6", "p8", "p9"]
    assert removed(rejected) == {"p1": ("duplicate_exact", "p0"), "p2": ("near_duplicate", "p0"),
                                 "p3": ("near_duplicate", "p0"), "p7": ("duplicate_exact", "p6")}
    assert stats["duplicates"] == {"duplicate_exact": 2, "near_duplicate": 2}
    assert kept.num_rows + rejected.num_rows == len(questions)
    assert kept.schema == problems(questions).schema


def test_numbers_rule_can_be_turned_off():
    q = [BASE, BASE.replace("12 cows", "13 cows")]
    kept, _, _ = dedup_table(problems(q), DedupConfig())
    assert kept.num_rows == 2
    kept, rejected, _ = dedup_table(problems(q), DedupConfig(numbers_must_match=False))
    assert kept.num_rows == 1 and removed(rejected) == {"p1": ("near_duplicate", "p0")}


def test_cluster_keeps_held_out_then_original_then_first():
    q = [BASE, BASE + " ", BASE.lower(), BASE.replace("Monday", "Friday")]
    t = problems(q, split=["train", "train", "test", "train"], origin=["paraphrase", "original", "original", "original"])
    kept, rejected, _ = dedup_table(t, DedupConfig())
    # the held-out copy (p2) stays: dropping it would leave its duplicate in training data
    assert kept.column("problem_id").to_pylist() == ["p2"]
    assert {k: v[1] for k, v in removed(rejected).items()} == {"p0": "p2", "p1": "p2", "p3": "p2"}
    t = problems(q[:2], origin=["variant", "original"])
    kept, _, _ = dedup_table(t, DedupConfig())
    assert kept.column("problem_id").to_pylist() == ["p1"]  # an original before a rewrite


def test_helpers():
    assert exact_key(" What  is\t3+4? ") == exact_key("what is 3+4?") == "whatis3+4?"
    assert numbers("w012345 has 2x + 3.5 = 1,000 and x2") == ("1,000", "2", "3.5")
    assert shingles("What is 3 + 4?", 2) == {"what is", "is 3", "3 +", "+ 4", "4 ?"}
    assert shingles("Hi", 3) == {"hi"}
