"""Decontam: benchmark n-gram overlaps are removed with the benchmark's name; near-misses stay."""

from __future__ import annotations

import csv
import json

import pytest

from factory import schema
from factory.stages.decontam import BenchmarkConfig, BenchmarkIndex, decontam_table, ngrams
from factory.stages.ingest import IngestError

BENCH_Q = ("Let f(x) = 3x^2 + 2x - 5. A student evaluates f at every integer from 1 to 10 "
           "and adds the results. What is the sum that the student obtains at the end?")


@pytest.fixture
def bench_files(tmp_path):
    with open(tmp_path / "bench.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["problem", "solution"])
        w.writerow([BENCH_Q, "1,000"])
        w.writerow(["What is 3 + 4?", "7"])  # shorter than n: matched whole
    (tmp_path / "other.jsonl").write_text(json.dumps({"question": "Name the capital of France in one word please now."}) + "\n")
    return tmp_path


def table(questions, parents=None):
    rows = [{"problem_id": f"p{i}", "question": q, "answer": "1", "domain": "math", "split": "train",
             "origin": "original" if not (parents and parents[i]) else "paraphrase",
             "parent_problem_id": parents[i] if parents else None} for i, q in enumerate(questions)]
    return schema.table(rows, schema.PROBLEMS)


def test_overlaps_removed_with_benchmark_name(bench_files):
    index = BenchmarkIndex([BenchmarkConfig("mini_math", [str(bench_files / "bench.csv")], "problem"),
                            BenchmarkConfig("trivia", [str(bench_files / "other.jsonl")])], n=8)
    assert index.counts == {"mini_math": 2, "trivia": 1}
    words = BENCH_Q.split()
    questions = [
        "Solve this. " + " ".join(words[5:14]) + " Then explain.",   # p0: 9 benchmark words in a row
        " ".join(words[5:12]) + " and something else entirely here.",  # p1: only 7 in a row: kept
        "WHAT is 3+4?",                                                # p2: the short question, other case/spacing
        "What is 3 + 4 + 5?",                                          # p3: near-miss of the short one: kept
        "Name the capital of France in one word please now. Thanks.",  # p4: other benchmark, other format
        "A paraphrase of p0 sharing no words with any benchmark.",     # p5: rewrite of a contaminated parent
        "A paraphrase of p1 sharing nothing.",                         # p6: rewrite of a clean parent
    ]
    kept, rejected, stats = decontam_table(table(questions, [None] * 5 + ["p0", "p1"]), index)
    assert kept.column("problem_id").to_pylist() == ["p1", "p3", "p6"]
    got = {r["problem_id"]: (r["drop_reason"], json.loads(r["record"])["benchmark"]) for r in rejected.to_pylist()}
    assert got == {"p0": ("contaminated", "mini_math"), "p2": ("contaminated", "mini_math"),
                   "p4": ("contaminated", "trivia"), "p5": ("contaminated_parent", "mini_math")}
    detail = next(r["detail"] for r in rejected.to_pylist() if r["problem_id"] == "p0")
    assert "bench.csv row 2" in detail and "mini_math" in detail
    assert stats["contaminated_by"] == {"mini_math": 3, "trivia": 1}


def test_ngram_size_matters(bench_files):
    words = BENCH_Q.split()
    q = table(["Intro: " + " ".join(words[:10]) + " outro."])
    for n, dropped in ((8, 1), (13, 0)):
        index = BenchmarkIndex([BenchmarkConfig("mini_math", [str(bench_files / "bench.csv")], "problem")], n=n)
        _, rejected, _ = decontam_table(q, index)
        assert rejected.num_rows == dropped


def test_bad_benchmark_config(tmp_path):
    with pytest.raises(IngestError, match="missing.jsonl.*mini"):
        BenchmarkIndex([BenchmarkConfig("mini", [str(tmp_path / "missing.jsonl")])], n=8)
    with pytest.raises(ValueError, match="name and paths"):
        BenchmarkIndex([BenchmarkConfig("", [])], n=8)
    assert ngrams("a b", 3) == {("a", "b")} and ngrams("", 3) == set()
