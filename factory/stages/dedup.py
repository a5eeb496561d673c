"""Stage `dedup`: one problem per cluster of duplicate questions.

In:  problems (after rewrite, or straight from ingest).   Out: the same table minus the
duplicates; each removed row goes to rejected/dedup/ as `duplicate_exact` or
`near_duplicate`, with the id of the problem it duplicates (in `detail` and in the kept
record as `duplicate_of`).

A global stage (a duplicate can sit in any shard), streamed: one pass over the shards
computes small keys per problem (a hash of its exact key, its LSH band hashes), the
clusters are found on those keys, and a second pass writes the rows out; the texts of
candidate pairs are read back from their shards for the exact checks (`dedup_rows`).
Two tests:

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

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from factory import schema, store


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
    return _shingles(normalize(question), n)


def _shingles(normalized: str, n: int) -> set[str]:
    toks = _TOKEN.findall(normalized)
    if len(toks) <= n:
        return {" ".join(toks)}
    return {" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def numbers(question: str) -> tuple[str, ...]:
    return _numbers(normalize(question))


def _numbers(normalized: str) -> tuple[str, ...]:
    return tuple(sorted(_NUMBER.findall(normalized)))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def _hash32(b: bytes) -> int:
    # crc32 is a C call, several times faster than datasketch's default sha1 and as good for
    # spreading shingles over 32 bits; stable across processes, unlike Python's hash()
    return zlib.crc32(b)


def dedup_table(problems: pa.Table, cfg: DedupConfig) -> tuple[pa.Table, pa.Table, dict]:
    """Remove duplicate questions from an in-memory table (`dedup_rows` on it).

    Returns:
        (kept problems in their input order, rejected rows, stats with cluster counts).
    """
    kept, rejected = [], []
    stats = {}
    for keep, row in dedup_rows(store.Shards.of_table(problems), cfg, stats):
        (kept if keep else rejected).append(row)
    return pa.Table.from_pylist(kept, schema=problems.schema), schema.table(rejected, schema.REJECTED), stats


def dedup_rows(problems: store.Shards, cfg: DedupConfig, stats: dict) -> Iterator[tuple[bool, dict]]:
    """Every row of `problems` in input order, with whether it is kept; a removed row comes as
    its rejected row. `stats` gets the cluster counts once the rows are through.

    Memory is bounded by small keys per problem, not by the run's texts: a 128-bit hash of its
    exact key, its keep rank and, with `near`, its LSH band hashes (8 bytes each) and bucket ids
    (4 bytes each): about 200 bytes per problem at 128 permutations (14 bands). Besides those,
    the texts of the rows that share an LSH bucket with another row (the candidate pairs, read
    back from the shards in one pass for the exact check) and the removed rows' kept ids.
    """
    from datasketch import MinHash  # (imported here: it takes its time and scipy with it)

    n = problems.num_rows
    exact_hash = np.zeros((n, 2), dtype=np.uint64)
    group = np.zeros(n, dtype=np.int8)
    lsh = _lsh(cfg) if cfg.near else None
    bands = np.zeros((n, lsh.b if lsh else 0), dtype=np.uint64)
    at, names = 0, problems.column_names
    for t in problems.tables([c for c in ("question", "split", "origin") if c in names]):
        qs, splits, origins = (t.column(c).to_pylist() if c in names else [None] * t.num_rows
                               for c in ("question", "split", "origin"))
        norm = [normalize(q) for q in qs]
        for k, (q, split, origin) in enumerate(zip(norm, splits, origins)):
            exact_hash[at + k] = np.frombuffer(hashlib.blake2b(re.sub(r"\s+", "", q).encode(), digest_size=16).digest(),
                                               np.uint64)
            group[at + k] = 4 * (split == cfg.train_split) + ORIGIN_RANK.get(origin or "original", 3)
        if lsh is not None and qs:
            mhs = MinHash.bulk(([s.encode() for s in _shingles(q, cfg.ngram)] for q in norm), num_perm=cfg.num_perm,
                               seed=cfg.seed, hashfunc=_hash32)
            h = band_hashes(np.stack([m.hashvalues for m in mhs]), lsh)
            if cfg.numbers_must_match:  # rows with other numbers are never duplicates: never in one bucket
                nums = np.array([int.from_bytes(hashlib.blake2b(repr(_numbers(q)).encode(), digest_size=8).digest(), "big")
                                 for q in norm], dtype=np.uint64)
                with np.errstate(over="ignore"):
                    h = (h ^ nums[:, None]) * np.uint64(0x100000001B3)
            bands[at: at + len(qs)] = h
        at += len(qs)
    # the order clusters keep rows in (first wins): held-out before training, originals before
    # paraphrases before variants, then file order
    order = np.lexsort((np.arange(n), group))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    del group, order
    removed: dict[int, tuple[str, int, str]] = {}  # row -> (reason, kept row, detail)
    if cfg.exact and n:
        by_key = np.lexsort((rank, exact_hash[:, 1], exact_hash[:, 0]))
        h = exact_hash[by_key]
        same = np.all(h[1:] == h[:-1], axis=1)  # a row with the key of the row before it (in keep order)
        starts = np.flatnonzero(np.concatenate([[True], ~same]))
        run_first = np.repeat(by_key[starts], np.diff(np.concatenate([starts, [n]])))
        for i, j in zip(by_key[1:][same].tolist(), run_first[1:][same].tolist()):
            removed[i] = ("duplicate_exact", j, "same text up to case and whitespace")
    del exact_hash
    if lsh is not None:
        _near(problems, bands, rank, cfg, removed)
    del bands, rank
    reasons = [v[0] for v in removed.values()]
    stats["duplicates"] = {"duplicate_exact": reasons.count("duplicate_exact"),
                           "near_duplicate": reasons.count("near_duplicate")}
    kept_ids = _values(problems, "problem_id", {j for _, j, _ in removed.values()})
    at = 0
    for t in problems.tables():
        for k, row in enumerate(t.to_pylist()):
            if at + k not in removed:
                yield True, row
                continue
            reason, j, why = removed[at + k]
            yield False, schema.rejected_row("dedup", reason, {**row, "duplicate_of": kept_ids[j]},
                                             problem_id=row["problem_id"], detail=f"duplicates problem {kept_ids[j]} ({why})")
        at += t.num_rows


def _values(problems: store.Shards, column: str, rows: set[int]) -> dict[int, object]:
    """Column `column` of the rows `rows` (indices over all shards), in one pass over the shards."""
    out, at = {}, 0
    if not rows:
        return out
    for t in problems.tables([column]):
        values = t.column(column).to_pylist()
        for i in sorted(r for r in rows if at <= r < at + len(values)):
            out[i] = values[i - at]
        at += len(values)
    return out


def _lsh(cfg: DedupConfig):
    """datasketch's LSH for the threshold: its band count and width (b, r), chosen by the library."""
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)


def band_hashes(hashvalues: np.ndarray, lsh) -> np.ndarray:
    """[rows, num_perm] MinHash values -> [rows, b] one 64-bit hash per LSH band (its r values).
    Two rows share a band in datasketch's index exactly when their r values are equal; equal
    values give equal hashes here, and a chance collision only adds a candidate pair, which the
    exact check then rejects."""
    out = np.zeros((hashvalues.shape[0], lsh.b), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k, (start, end) in enumerate(lsh.hashranges):
            h = np.full(hashvalues.shape[0], 0xCBF29CE484222325, dtype=np.uint64)
            for c in range(start, end):  # FNV-1a over the band's values, as words
                h = (h ^ hashvalues[:, c]) * np.uint64(0x100000001B3)
            out[:, k] = h
    return out


def _near(problems: store.Shards, bands: np.ndarray, rank: np.ndarray, cfg: DedupConfig, removed: dict) -> None:
    """Greedy clustering in keep order: a row is removed if it is a near-duplicate of a row
    already kept. The LSH buckets (rows sharing a band's hash, and their numbers when those must
    match) only propose candidates; the exact Jaccard and the number rule decide. This is
    datasketch's MinHashLSH insert / query loop, with the buckets found by sorting every row's
    band hashes (as datatrove's MinHash dedup does) instead of datasketch's dict of every
    bucket, which took ~5 KB per problem (NOTES.md); this takes ~60 bytes. Only rows in a
    bucket with another row are looked at, and only their texts are read back."""
    n, b = bands.shape
    alive = np.ones(n, dtype=bool)
    alive[list(removed)] = False  # exact duplicates are neither kept nor asked
    idx = np.flatnonzero(alive)
    bucket = np.full((n, b), -1, dtype=np.int32)
    for k in range(b):
        h = bands[idx, k]
        s = np.argsort(h, kind="stable")
        hs = h[s]
        starts = np.flatnonzero(np.concatenate([[True], hs[1:] != hs[:-1]]))
        sizes = np.diff(np.concatenate([starts, [len(hs)]]))
        run = np.repeat(np.arange(len(starts)), sizes)
        shared = np.repeat(sizes > 1, sizes)
        bucket[idx[s[shared]], k] = run[shared]
    todo = np.flatnonzero((bucket >= 0).any(axis=1))
    todo = todo[np.argsort(rank[todo], kind="stable")]
    texts = _values(problems, "question", set(todo.tolist()))

    def facts(i: int) -> tuple:  # made again each time (a cache of shingle sets cost ~4 KB a row)
        q = normalize(texts[i])
        return _shingles(q, cfg.ngram), _numbers(q)

    kept_in: dict[tuple[int, int], list[int]] = {}
    for i in todo.tolist():
        sh, nums = facts(i)
        mine = [(k, int(v)) for k, v in enumerate(bucket[i]) if v >= 0]
        best = None
        for j in sorted({j for key in mine for j in kept_in.get(key, ())}):
            other, other_nums = facts(j)
            if cfg.numbers_must_match and other_nums != nums:
                continue
            sim = jaccard(sh, other)
            if sim >= cfg.threshold and (best is None or sim > best[0]):
                best = (sim, j)
        if best is None:
            for key in mine:
                kept_in.setdefault(key, []).append(i)
        else:
            removed[i] = ("near_duplicate", best[1], f"Jaccard {best[0]:.2f} on word {cfg.ngram}-grams")
            del texts[i]  # a removed row is never a candidate again
