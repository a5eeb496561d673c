"""Stage `ingest`: <question, answer> problems from files on disk.

In:  JSONL, JSON (a list, or {"data": [...]}), CSV, Parquet files, or a directory saved
     with `datasets.Dataset.save_to_disk`; `columns` maps their column names onto ours.
Out: problems (schema.PROBLEMS), plus rejected rows with the file, row and field at fault.

A row with a missing, empty, mistyped or over-long question or answer, an unknown domain,
or undecodable bytes is rejected with its reason; its neighbours go on. A file that can't be
parsed at all (a broken JSON document, a corrupt Parquet footer) is an error naming the file
and line. Exact-duplicate questions (after whitespace/case normalization) are merged: the
first is kept and the others are rejected naming the id they duplicate.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from factory import schema


class IngestError(ValueError):
    """A whole input file is unreadable; the message names the file and line."""


@dataclass
class IngestConfig:
    paths: list[str] = field(default_factory=list)
    """Input files or `datasets` directories (relative paths are from the working directory)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Our field -> the input's column, e.g. {question: problem, answer: solution}."""
    default_domain: str = "math"
    """Domain of rows without one: math | numeric | choice | exact."""
    default_split: str = "train"
    """Split of rows without one."""
    default_source: str | None = None
    """Source of rows without one (the file name when unset)."""
    max_question_chars: int = 8000
    """Longer questions are rejected (question_too_long)."""
    max_answer_chars: int = 500
    """Longer reference answers are rejected (answer_too_long): graders want a final answer."""
    problems_per_shard: int = 256
    """Problems per output shard: the unit of work and of resume for later stages."""
    sample: int | None = None
    """Keep this many of the valid problems, drawn by a seeded hash of each problem_id (the
    same problems whatever the file order or sharding); the others are rejected as
    not_sampled. Unset: all."""
    sample_seed: int = 0
    """Seed of the draw."""


FIELDS = ("problem_id", "question", "answer", "domain", "choices", "source", "split", "level")


@dataclass
class Raw:
    file: str
    row: int  # 1-based line (JSONL, CSV) or record index (JSON, Parquet, datasets)
    record: object
    error: str | None = None  # set when the row itself could not be read (e.g. bad bytes)


def _decode_lines(path: Path) -> Iterator[tuple[int, str | None, bytes]]:
    for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            yield i, raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            yield i, None, raw


def read_jsonl(path: Path) -> Iterator[Raw]:
    for i, line, raw in _decode_lines(path):
        if line is None:
            yield Raw(str(path), i, raw.decode("utf-8", "replace"), "invalid_utf8")
        elif line.strip():
            try:
                yield Raw(str(path), i, json.loads(line))
            except json.JSONDecodeError as e:
                yield Raw(str(path), i, line, f"invalid_json: {e.msg} at column {e.colno}")


def read_json(path: Path) -> Iterator[Raw]:
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: not UTF-8 at byte {e.start}; re-encode the file or use JSONL") from None
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    records = doc.get("data") if isinstance(doc, dict) else doc
    if not isinstance(records, list):
        raise IngestError(f"{path}: expected a JSON list of records or {{\"data\": [...]}}")
    for i, rec in enumerate(records):
        yield Raw(str(path), i, rec)


def read_csv(path: Path) -> Iterator[Raw]:
    # surrogateescape keeps undecodable bytes visible per row instead of failing the file
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for rec in reader:
        row = reader.line_num
        if any(isinstance(v, str) and re.search(r"[\udc80-\udcff]", v) for v in rec.values()):
            clean = {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v
                     for k, v in rec.items()}
            yield Raw(str(path), row, clean, "invalid_utf8")
        else:
            yield Raw(str(path), row, rec)


def read_table(path: Path, table: pa.Table) -> Iterator[Raw]:
    for i, rec in enumerate(table.to_pylist()):
        yield Raw(str(path), i, rec)


def read_any(path: Path) -> Iterator[Raw]:
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise IngestError(f"{path}: a DatasetDict; point paths at one split's directory")
        yield from read_table(path, ds.data.table)
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from read_jsonl(path)
    elif suffix == ".json":
        yield from read_json(path)
    elif suffix == ".csv":
        yield from read_csv(path)
    elif suffix == ".parquet":
        try:
            t = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise IngestError(f"{path}: not a readable Parquet file ({e})") from None
        yield from read_table(path, t)
    else:
        raise IngestError(f"{path}: unknown format {suffix!r} (use .jsonl, .json, .csv, .parquet or a datasets dir)")


def normalize_question(q: str) -> str:
    return re.sub(r"\s+", " ", q).strip().lower()


def content_id(question: str, answer: str) -> str:
    return hashlib.sha256(f"{normalize_question(question)}\x00{answer.strip()}".encode()).hexdigest()[:16]


def validate(raw: Raw, cfg: IngestConfig) -> tuple[dict | None, str, str]:
    """One raw record to a problem row, or (None, reason, detail)."""
    where = f"{raw.file} row {raw.row}"
    if raw.error:
        reason = raw.error.split(":")[0]
        return None, reason, f"{where}: {raw.error}"
    if not isinstance(raw.record, dict):
        return None, "bad_record", f"{where}: expected an object with question and answer, got {type(raw.record).__name__}"
    rec = raw.record
    col = {f: cfg.columns.get(f, f) for f in FIELDS}
    out: dict = {}
    for f, limit in (("question", cfg.max_question_chars), ("answer", cfg.max_answer_chars)):
        v = rec.get(col[f])
        if v is None:
            return None, f"missing_{f}", f"{where}: field {col[f]!r} is missing or null"
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            return None, f"bad_type_{f}", f"{where}: field {col[f]!r} must be text, got {type(v).__name__}"
        v = str(v).strip()
        if not v:
            return None, f"empty_{f}", f"{where}: field {col[f]!r} is empty"
        if len(v) > limit:
            return None, f"{f}_too_long", f"{where}: field {col[f]!r} has {len(v)} chars (max_{f}_chars={limit})"
        out[f] = v
    domain = rec.get(col["domain"]) or cfg.default_domain
    if domain not in schema.DOMAINS:
        return None, "bad_domain", f"{where}: field {col['domain']!r} is {domain!r}; use one of {', '.join(schema.DOMAINS)}"
    choices = rec.get(col["choices"])
    if isinstance(choices, str):  # CSV cells: a JSON list
        try:
            choices = json.loads(choices) if choices.strip() else None
        except json.JSONDecodeError:
            return None, "bad_type_choices", f"{where}: field {col['choices']!r} is not a JSON list"
    if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
        return None, "bad_type_choices", f"{where}: field {col['choices']!r} must be a list of strings"
    level = rec.get(col["level"])
    if isinstance(level, str) and level.strip().lstrip("-").isdigit():  # CSV cells, "3"
        level = int(level)
    if level == "":
        level = None
    if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
        return None, "bad_type_level", f"{where}: field {col['level']!r} must be a whole number, got {level!r}"
    given_id = rec.get(col["problem_id"])
    out.update(
        problem_id=str(given_id) if given_id not in (None, "") else content_id(out["question"], out["answer"]),
        domain=domain, choices=choices or None,
        source=str(rec.get(col["source"]) or cfg.default_source or Path(raw.file).name),
        split=str(rec.get(col["split"]) or cfg.default_split), level=level, origin="original",
    )
    return out, "", ""


def ingest(cfg: IngestConfig) -> tuple[pa.Table, pa.Table, list[str]]:
    """Read every path; return (problems, rejected, messages for the user)."""
    if not cfg.paths:
        raise IngestError("ingest.paths is empty: name at least one input file")
    rows, rejected, messages = [], [], []
    seen: dict[str, str] = {}
    for p in cfg.paths:
        path = Path(p)
        if not path.exists():
            raise IngestError(f"{path}: no such file or directory (ingest.paths)")
        for raw in read_any(path):
            row, reason, detail = validate(raw, cfg)
            if row is None:
                rejected.append(schema.rejected_row("ingest", reason, raw.record, detail))
                messages.append(detail)
                continue
            key = normalize_question(row["question"])
            if key in seen or row["problem_id"] in seen.values():
                kept = seen.get(key, row["problem_id"])
                rejected.append(schema.rejected_row(
                    "ingest", "duplicate_question", row,
                    f"{raw.file} row {raw.row}: duplicates problem {kept}", problem_id=row["problem_id"]))
                continue
            seen[key] = row["problem_id"]
            rows.append(row)
    if cfg.sample is not None and cfg.sample < len(rows):
        rank = lambda r: hashlib.sha256(f"{cfg.sample_seed}:{r['problem_id']}".encode()).digest()  # noqa: E731
        chosen = {r["problem_id"] for r in sorted(rows, key=rank)[: cfg.sample]}
        for r in rows:
            if r["problem_id"] not in chosen:
                rejected.append(schema.rejected_row("ingest", "not_sampled", r, f"ingest.sample={cfg.sample} of "
                                                    f"{len(rows)} (seed {cfg.sample_seed})", problem_id=r["problem_id"]))
        rows = [r for r in rows if r["problem_id"] in chosen]  # file order kept
    return schema.table(rows, schema.PROBLEMS), schema.table(rejected, schema.REJECTED), messages
