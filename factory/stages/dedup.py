"""Stage `dedup`: one problem per cluster of duplicate questions.

In:  problems (after rewrite, or straight from ingest).   Out: the same table minus the
duplicates; each removed row goes to rejected/dedup/ as `duplicate_exact` or
`near_duplicate`, with the id of the problem it duplicates (in `detail` and in the kept
record as `duplicate_of`).

Two passes over the whole table (it is a global stage: duplicates can sit in any shard):

- exact: the question with case and all whitespace removed (so "What is 3+4?" and
  "what is 3 + 4 ?" are one question);
- near: MinHash LSH (datasketch) over word n-gram shingles finds candidate pairs, and a pair
  counts as a duplicate only if its true Jaccard similarity reaches `threshold` **and** both
  questions hold the same numbers. The number rule is why "same template, other numbers"
  survives: in math data those are different problems with different answers, however
  similar the words.

Which member of a cluster is kept: a held-out row before a training row (a duplicate across
splits is a leak, and the held-out copy is the one that must stay), an original before a
paraphrase before a variant, then the earlier row.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from dataclasses import dataclass

import pyarrow as pa

from factory import schema


@dataclass
class DedupConfig:
    exact: bool = True
    """Remove questions equal after lowercasing and deleting whitespace."""
    near: bool = True
    """Remove near-duplicates found by MinHash LSH."""
    threshold: float = 0.7
    """Jaccard similarity of the shingle sets at or above which two questions are near-duplicates."""
    ngram: int = 2
    """Words per shingle (punctuation marks count as words)."""
    num_perm: int = 128
    """MinHash permutations: more is a closer estimate and a slower index."""
    numbers_must_match: bool = True
    """Near-duplicates must contain the same numbers (a template with other numbers is kept)."""
    seed: int = 1
    """MinHash seed (fixed: the same input gives the same clusters)."""
    train_split: str = "train"
    """The split name of training rows; any other split is held out and kept first in a cluster."""


_TOKEN = re.compile(r"\w+|[^\w\s]")
_NUMBER = re.compile(r"(?<!\w)\d+(?:[.,]\d+)*")  # a digit run not glued to a letter ("w2" is a name)
ORIGIN_RANK = {"original": 0, "paraphrase": 1, "variant": 2}


def normalize(question: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", question)).strip().lower()


def exact_key(question: str) -> str:
    return re.sub(r"\s+", "", normalize(question))


def shingles(question: str, n: int) -> set[str]:
    """Word n-grams of the normalized question; the whole question if it has fewer than n words."""
    toks = _TOKEN.findall(normalize(question))
    if len(toks) <= n:
        return {" ".join(toks)}
    return {" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def numbers(question: str) -> tuple[str, ...]:
    return tuple(sorted(_NUMBER.findall(normalize(question))))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def _hash32(b: bytes) -> int:
    # crc32 is a C call, several times faster than datasketch's default sha1 and as good for
    # spreading shingles over 32 bits; stable across processes, unlike Python's hash()
    return zlib.crc32(b)


def keep_order(rows: list[dict], train_split: str) -> list[int]:
    """Row indices in the order clusters keep them (first wins)."""
    return sorted(range(len(rows)), key=lambda i: (rows[i].get("split") == train_split,
                                                   ORIGIN_RANK.get(rows[i].get("origin") or "original", 3), i))


def dedup_table(problems: pa.Table, cfg: DedupConfig) -> tuple[pa.Table, pa.Table, dict]:
    """Remove duplicate questions from `problems`.

    Returns:
        (kept problems in their input order, rejected rows, stats with cluster counts).
    """
    rows = problems.to_pylist()
    removed: dict[int, tuple[str, int, str]] = {}  # row -> (reason, kept row, detail)
    order = keep_order(rows, cfg.train_split)
    if cfg.exact:
        first: dict[str, int] = {}
        for i in order:
            key = exact_key(rows[i]["question"])
            if key in first:
                removed[i] = ("duplicate_exact", first[key], "same text up to case and whitespace")
            else:
                first[key] = i
    if cfg.near:
        _near(rows, [i for i in order if i not in removed], cfg, removed)
    kept = [r for i, r in enumerate(rows) if i not in removed]
    rejected = []
    for i in sorted(removed):
        reason, j, why = removed[i]
        dup_of = rows[j]["problem_id"]
        rejected.append(schema.rejected_row(
            "dedup", reason, {**rows[i], "duplicate_of": dup_of}, problem_id=rows[i]["problem_id"],
            detail=f"duplicates problem {dup_of} ({why})"))
    reasons = [v[0] for v in removed.values()]
    stats = {"duplicates": {"duplicate_exact": reasons.count("duplicate_exact"),
                            "near_duplicate": reasons.count("near_duplicate")}}
    return (pa.Table.from_pylist(kept, schema=problems.schema), schema.table(rejected, schema.REJECTED), stats)


def _near(rows: list[dict], order: list[int], cfg: DedupConfig, removed: dict) -> None:
    """Greedy clustering in keep order: a row is removed if it is a near-duplicate of a row
    already kept. LSH only proposes candidates; the exact Jaccard and the number rule decide."""
    from datasketch import MinHash, MinHashLSH

    sh = {i: shingles(rows[i]["question"], cfg.ngram) for i in order}
    nums = {i: numbers(rows[i]["question"]) for i in order} if cfg.numbers_must_match else {}
    hashes = MinHash.bulk(([s.encode() for s in sh[i]] for i in order), num_perm=cfg.num_perm,
                          seed=cfg.seed, hashfunc=_hash32)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    for i, mh in zip(order, hashes):
        best = None
        for j in lsh.query(mh):
            if cfg.numbers_must_match and nums[j] != nums[i]:
                continue
            sim = jaccard(sh[i], sh[j])
            if sim >= cfg.threshold and (best is None or sim > best[0] or (sim == best[0] and j < best[1])):
                best = (sim, j)
        if best is None:
            lsh.insert(i, mh, check_duplication=False)
        else:
            removed[i] = ("near_duplicate", best[1], f"Jaccard {best[0]:.2f} on word {cfg.ngram}-grams")
