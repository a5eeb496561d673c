"""Stage `decontam`: drop problems that overlap a benchmark's questions.

In:  problems (after dedup, rewrite or ingest).   Out: the same table minus contaminated
rows; each goes to rejected/decontam/ as `contaminated`, naming the benchmark, the
benchmark row and the shared n-gram. A rewrite whose parent is contaminated is dropped too
(`contaminated_parent`): a paraphrase of a test question leaks it even when it shares no
n-gram with it.

Overlap is the usual n-gram test (GPT-3, Llama, OLMo reports): the text is lowercased, split
into words with punctuation removed, and any shared word n-gram (n = 13 by default; 8 is
stricter) flags the problem. A text shorter than n words is one n-gram, itself, so a short
benchmark question is matched whole rather than never.

Benchmark files are read with ingest's readers (JSONL, JSON, CSV, Parquet, datasets dirs);
only their question column is used.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from factory import schema, store
from factory.stages.ingest import IngestError, read_any


@dataclass
class BenchmarkConfig:
    name: str = ""
    """How the benchmark is named in rejected rows and the manifest (e.g. math500)."""
    paths: list[str] = field(default_factory=list)
    """Its question files, in any ingest format."""
    question_column: str = "question"
    """The column holding the question text (MATH-500 calls it `problem`)."""


@dataclass
class DecontamConfig:
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    """Benchmarks whose questions must not appear in the training data."""
    ngram: int = 13
    """Words per n-gram; one shared n-gram marks a problem contaminated."""


def words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    return re.findall(r"\w+", text)


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    if len(w) < n:
        return {tuple(w)} if w else set()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


class BenchmarkIndex:
    """Every n-gram of every benchmark question -> (benchmark, file, row) of its first sighting."""

    def __init__(self, benchmarks: list[BenchmarkConfig], n: int):
        self.n = n
        self.grams: dict[tuple[str, ...], tuple[str, str, int]] = {}
        self.counts: dict[str, int] = {}
        for b in benchmarks:
            if not b.name or not b.paths:
                raise ValueError("decontam.benchmarks: each benchmark needs a name and paths")
            n_q = 0
            for p in b.paths:
                if not Path(p).exists():
                    raise IngestError(f"{p}: no such file or directory (decontam benchmark {b.name!r})")
                for raw in read_any(Path(p)):
                    q = raw.record.get(b.question_column) if isinstance(raw.record, dict) else None
                    if not isinstance(q, str) or not q.strip():
                        continue  # a benchmark row without a question can't contaminate anything
                    n_q += 1
                    for g in ngrams(q, n):
                        self.grams.setdefault(g, (b.name, raw.file, raw.row))
            self.counts[b.name] = n_q

    def match(self, text: str) -> tuple[tuple[str, ...], tuple[str, str, int]] | None:
        w = words(text)
        if len(w) < self.n:  # a short text is contaminated only if a short benchmark question equals it
            g = tuple(w)
            return (g, self.grams[g]) if g in self.grams else None
        for i in range(len(w) - self.n + 1):
            g = tuple(w[i:i + self.n])
            if g in self.grams:
                return g, self.grams[g]
        return None


def decontam_table(problems: pa.Table, index: BenchmarkIndex) -> tuple[pa.Table, pa.Table, dict]:
    """Drop the rows of an in-memory table that overlap `index`, and rewrites of such rows.

    Returns:
        (kept problems, rejected rows, stats: contaminated count per benchmark).
    """
    kept, rejected, stats = [], [], {}
    for keep, row in decontam_rows(store.Shards.of_table(problems), index, stats):
        (kept if keep else rejected).append(row)
    return pa.Table.from_pylist(kept, schema=problems.schema), schema.table(rejected, schema.REJECTED), stats


def decontam_rows(problems: store.Shards, index: BenchmarkIndex, stats: dict) -> Iterator[tuple[bool, dict]]:
    """Every row of `problems` in input order, with whether it is kept (a dropped row comes as
    its rejected row); `stats` gets the count per benchmark. Two passes over the shards: the
    first finds the contaminated problems (their ids and benchmark: memory bounded by the
    contamination, not the run), the second drops them and the rewrites of any of them."""
    hit = {}  # problem_id -> benchmark
    for t in problems.tables(["problem_id", "question"]):
        for pid, q in zip(t.column("problem_id").to_pylist(), t.column("question").to_pylist()):
            if (m := index.match(q)) is not None:
                hit[pid] = m[1][0]
    per_benchmark: dict[str, int] = {}
    for t in problems.tables():
        for r in t.to_pylist():
            pid, parent = r["problem_id"], r.get("parent_problem_id")
            if pid in hit:
                gram, (name, file, row) = index.match(r["question"])
                yield False, schema.rejected_row(
                    "decontam", "contaminated", {**r, "benchmark": name}, problem_id=pid,
                    detail=f"shares the {len(gram)}-gram {' '.join(gram)!r} with benchmark {name} ({file} row {row})")
            elif parent in hit:
                name = hit[parent]
                yield False, schema.rejected_row(
                    "decontam", "contaminated_parent", {**r, "benchmark": name}, problem_id=pid,
                    detail=f"a rewrite of problem {parent}, which overlaps benchmark {name}")
            else:
                yield True, r
                continue
            per_benchmark[name] = per_benchmark.get(name, 0) + 1
    stats["contaminated_by"] = per_benchmark
