"""Durable, resumable storage of a run's tables.

A stage writes into `RUN/stages/<name>/`: numbered Parquet shards, each written to a temp
file and renamed into place, then a `<shard>.done` marker holding that shard's counts.
A shard with a marker is finished and is skipped by a re-run; one without is redone.
`_stage.json` holds the stage's fingerprint (its config plus the fingerprint of its input):
when it changes, the stage's directory is wiped, and because the next stage's fingerprint
includes this one, everything downstream re-runs too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from factory import schema


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write atomically: a reader sees the old file, or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def claim_dir(path: Path, fp: str, meta: dict, marker: str) -> bool:
    """A directory of work made from inputs with fingerprint `fp`: True when its `marker` file
    says it was made from the same inputs (reuse what is there); otherwise it is cleared and
    the marker (fingerprint + `meta`) written, so nothing made from other inputs survives."""
    mark = Path(path) / marker
    if mark.exists() and read_json(mark).get("fingerprint") == fp:
        return True
    if Path(path).exists():
        shutil.rmtree(path)
    write_json({**meta, "fingerprint": fp}, mark)
    return False


class StageDir:
    """The shards, markers and fingerprint of one stage of one run."""

    def __init__(self, run_dir: Path, name: str):
        self.name = name
        self.path = Path(run_dir) / "stages" / name

    def open(self, fp: str, config: Any) -> bool:
        """Prepare for a run with fingerprint `fp`; return True if earlier work is reused."""
        return claim_dir(self.path, fp, {"stage": self.name, "config": config}, "_stage.json")

    @property
    def fingerprint(self) -> str | None:
        meta = self.path / "_stage.json"
        return read_json(meta)["fingerprint"] if meta.exists() else None

    def shard(self, i: int) -> Path:
        return self.path / f"shard-{i:05d}.parquet"

    def rejected_shard(self, i: int) -> Path:
        return self.path / f"rejected-{i:05d}.parquet"

    def is_done(self, i: int) -> bool:
        return self.shard(i).with_suffix(".done").exists()

    def write_shard(self, i: int, out: pa.Table, rejected: pa.Table, stats: dict) -> None:
        """Write shard `i` and its rejected rows, then the marker that says both are whole."""
        write_parquet(rejected, self.rejected_shard(i))
        write_parquet(out, self.shard(i))
        write_json(stats, self.shard(i).with_suffix(".done"))

    def finish(self, num_shards: int, summary: dict) -> None:
        write_json({"num_shards": num_shards, **summary}, self.path / "_complete.json")

    @property
    def complete(self) -> dict | None:
        p = self.path / "_complete.json"
        return read_json(p) if p.exists() else None

    def num_shards(self) -> int:
        done = self.complete
        if done is None:
            raise RuntimeError(f"stage {self.name!r} in {self.path} has not finished")
        return done["num_shards"]

    def read_shard(self, i: int) -> pa.Table:
        return pq.read_table(self.shard(i))

    def iter_shards(self) -> Iterator[tuple[int, pa.Table]]:
        for i in range(self.num_shards()):
            yield i, self.read_shard(i)

    def read(self) -> pa.Table:
        return pa.concat_tables([t for _, t in self.iter_shards()])

    def read_rejected(self) -> pa.Table:
        parts = [pq.read_table(p) for p in sorted(self.path.glob("rejected-*.parquet"))]
        return pa.concat_tables(parts) if parts else schema.table([], schema.REJECTED)

    def shard_stats(self) -> list[dict]:
        return [read_json(p) for p in sorted(self.path.glob("shard-*.done"))]


def count_reasons(rejected: pa.Table) -> dict[str, int]:
    return dict(Counter(rejected.column("drop_reason").to_pylist())) if rejected.num_rows else {}
