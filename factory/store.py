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
import heapq
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from factory import schema


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def input_signature(paths: list[str]) -> list:
    """Each file under `paths` (a directory: every file below it) as (path, size, mtime): what a
    fingerprint holds of input files, so that editing one reruns what read it."""
    sig = []
    for p in map(Path, paths):
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        sig += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return sig


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_parquet(table: pa.Table, path: Path, row_group_size: int | None = None) -> None:
    """Write atomically: a reader sees the old file, or the whole new one, never half.
    Small row groups let a merge read the file a few rows at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=row_group_size)
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

    def write_shard(self, i: int, out: pa.Table, rejected: pa.Table, stats: dict,
                    extra: dict[str, pa.Table] | None = None, row_group_size: int | None = None,
                    source: str | None = None) -> None:
        """Write shard `i`, its rejected rows and any `extra` tables (`<name>-NNNNN.parquet`),
        then the marker that says all are whole. The marker gets a new `seal` (so a stage
        reading this shard can tell it was rewritten) and `source`, the seal of the upstream
        shard this one was made from."""
        write_parquet(rejected, self.rejected_shard(i))
        for name, t in (extra or {}).items():
            write_parquet(t, self.extra_shard(name, i), row_group_size)
        write_parquet(out, self.shard(i), row_group_size)
        write_json({**stats, "seal": os.urandom(8).hex(), "source": source}, self.shard(i).with_suffix(".done"))

    def stats(self, i: int) -> dict | None:
        """Shard `i`'s marker (its counts), None while it is not done."""
        p = self.shard(i).with_suffix(".done")
        return read_json(p) if p.exists() else None

    def seal(self, i: int) -> str | None:
        return (self.stats(i) or {}).get("seal")

    def stale(self, i: int, upstream: "StageDir") -> bool:
        """Shard `i` must be (re)made: not done, or made from another seal of upstream's shard `i`
        (a rollout shard re-sealed after its failed requests were sent again)."""
        mine = self.stats(i)
        return mine is None or mine.get("source") != upstream.seal(i)

    def unfinish(self) -> None:
        """The stage is no longer complete (a shard is being redone)."""
        (self.path / "_complete.json").unlink(missing_ok=True)

    def extra_shard(self, name: str, i: int) -> Path:
        return self.path / f"{name}-{i:05d}.parquet"

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

    def shard_rows(self, i: int) -> int:
        """Rows of shard `i`, from its footer (nothing else is read)."""
        return pq.ParquetFile(self.shard(i)).metadata.num_rows

    def read_shard(self, i: int) -> pa.Table:
        return pq.read_table(self.shard(i))

    def iter_shards(self) -> Iterator[tuple[int, pa.Table]]:
        for i in range(self.num_shards()):
            yield i, self.read_shard(i)

    def read(self) -> pa.Table:
        return pa.concat_tables([t for _, t in self.iter_shards()])

    def read_rejected(self) -> pa.Table:
        parts = [pq.read_table(p) for p in self.rejected_files()]
        return pa.concat_tables(parts) if parts else schema.table([], schema.REJECTED)

    def rejected_files(self) -> list[Path]:
        return sorted(self.path.glob("rejected-*.parquet"))

    def shard_stats(self) -> list[dict]:
        return [read_json(p) for p in sorted(self.path.glob("shard-*.done"))]


def count_reasons(rejected: pa.Table) -> dict[str, int]:
    return dict(Counter(rejected.column("drop_reason").to_pylist())) if rejected.num_rows else {}


def link_or_copy(src: Path, dst: Path) -> None:
    """dst as a hard link to src (no bytes copied), or a copy where links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def iter_rows(path: Path, batch_rows: int = 64) -> Iterator[dict]:
    """A Parquet file's rows as dicts, a batch at a time (memory: one row group)."""
    f = pq.ParquetFile(path)
    for batch in f.iter_batches(batch_size=batch_rows):
        yield from batch.to_pylist()


class ShardedWriter:
    """Rows into `dir/<prefix>-NNNNN.parquet` files of `rows_per_file` rows, written a row group at a
    time (memory: one row group). Files land in a temp dir, swapped into place by `commit`."""

    def __init__(self, path: Path, prefix: str, table_schema: pa.Schema, rows_per_file: int,
                 index_column: str | None = None, row_group: int = 256):
        self.path, self.prefix, self.schema = Path(path), prefix, table_schema
        self.rows_per_file, self.row_group, self.index_column = max(1, rows_per_file), row_group, index_column
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.index: list[dict] = []
        self._writer, self._buf, self._rows = None, [], 0

    def write(self, row: dict) -> None:
        if self._writer is None:
            name = f"{self.prefix}-{len(self.index):05d}.parquet"
            self._writer = pq.ParquetWriter(self.tmp / name, self.schema)
            self.index.append({"file": f"{self.path.name}/{name}", "rows": 0})
            self._rows = 0
        self._buf.append(row)
        entry = self.index[-1]
        entry["rows"] += 1
        if self.index_column is not None:
            v = row[self.index_column]
            entry[f"{self.index_column}_min"] = min(entry.get(f"{self.index_column}_min", v), v)
            entry[f"{self.index_column}_max"] = max(entry.get(f"{self.index_column}_max", v), v)
        self._rows += 1
        if len(self._buf) >= self.row_group or self._rows >= self.rows_per_file:
            self._flush()
        if self._rows >= self.rows_per_file:
            self._writer.close()
            self._writer = None

    def _flush(self) -> None:
        if self._buf:
            self._writer.write_table(pa.Table.from_pylist(self._buf, schema=self.schema))
            self._buf = []

    def commit(self) -> list[dict]:
        """Close the last file (an empty output still gets one empty file) and swap the dir in."""
        if self._writer is None and not self.index:
            name = f"{self.prefix}-00000.parquet"
            pq.write_table(self.schema.empty_table(), self.tmp / name)
            self.index.append({"file": f"{self.path.name}/{name}", "rows": 0})
        if self._writer is not None:
            self._flush()
            self._writer.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self.tmp.rename(self.path)
        return self.index


def merge_sorted(files: list[Path], key, sink: Callable[[dict], None], scratch: Path, fan_in: int = 64) -> None:
    """Merge Parquet files each sorted by `key` into one sorted stream of rows to `sink`.
    At most `fan_in` files are open at once (memory: fan_in row groups); more files are
    first merged in groups into runs under `scratch` (an external merge sort). Equal keys
    keep file order, then row order."""
    files = list(files)
    level = 0
    while len(files) > fan_in:
        runs = []
        for g in range(0, len(files), fan_in):
            run = Path(scratch) / f"run-{level}-{g // fan_in:05d}.parquet"
            run.parent.mkdir(parents=True, exist_ok=True)
            group = files[g: g + fan_in]
            with pq.ParquetWriter(run, pq.read_schema(group[0])) as w:
                buf = []
                for row in heapq.merge(*(iter_rows(f) for f in group), key=key):
                    buf.append(row)
                    if len(buf) >= 256:
                        w.write_table(pa.Table.from_pylist(buf, schema=w.schema))
                        buf = []
                if buf:
                    w.write_table(pa.Table.from_pylist(buf, schema=w.schema))
            runs.append(run)
        files, level = runs, level + 1
    for row in heapq.merge(*(iter_rows(f) for f in files), key=key):
        sink(row)
    shutil.rmtree(scratch, ignore_errors=True)


class Shards:
    """A table kept as shards, read whole shard by shard, as many passes as a stage needs: what
    a global stage (dedup, decontam) reads instead of the whole table, so its memory is a shard
    plus its own small keys."""

    def __init__(self, read: Callable[[int, list[str] | None], pa.Table], sizes: list[int], names: list[str]):
        self.read, self.sizes, self.column_names = read, list(sizes), names

    @classmethod
    def of(cls, sd: "StageDir") -> "Shards":
        n = sd.num_shards()
        return cls(lambda i, columns: pq.read_table(sd.shard(i), columns=columns), [sd.shard_rows(i) for i in range(n)],
                   pq.read_schema(sd.shard(0)).names)

    @classmethod
    def of_table(cls, table: pa.Table, rows_per_shard: int = 4096) -> "Shards":
        """An in-memory table seen as shards (tests, callers that already hold the table)."""
        n = max(1, -(-table.num_rows // rows_per_shard))
        sizes = [min(rows_per_shard, table.num_rows - i * rows_per_shard) for i in range(n)]

        def read(i, columns):
            part = table.slice(i * rows_per_shard, sizes[i])
            return part.select(columns) if columns else part
        return cls(read, sizes, table.schema.names)

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)

    def tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for i in range(len(self.sizes)):
            yield self.read(i, columns)
