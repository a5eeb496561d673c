"""Stage `ingest`: <question, answer> problems from files on disk.

In:  JSONL, JSON (a list, or {"data": [...]}), CSV, Parquet files, a directory saved
     with `datasets.Dataset.save_to_disk`, or a hub dataset `hf://owner/name[:config][/split]`
     (through `datasets.load_dataset`, so its cache works offline); `columns` maps their
     column names onto ours, and `preset` does it for the common public sources (presets.py).
Out: problems (schema.PROBLEMS), plus rejected rows with the file, row and field at fault.

The reference is read from the answer column by `answer_from` (as it is, its last \\boxed{},
GSM8K's "####" line, a regex, an option index or an option's text); the raw value is kept in
`answer_raw` and how it was read in `reference_source`. A reference the grader could never
read (no boxed answer in the solution, prose, "proof", a number that is not one) is rejected
here as `unreadable_reference` with its value, not found later as K unverifiable traces.

A row with a missing, empty, mistyped or over-long question or answer, an unknown domain,
or undecodable bytes is rejected with its reason; its neighbours go on. A file that can't be
parsed at all (a broken JSON document, a corrupt Parquet footer) is an error naming the file
and line. Exact-duplicate questions (after whitespace/case normalization) are merged: the
first is kept and the others are rejected naming the id they duplicate.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from factory import answers, schema, verify
from factory.stages.presets import preset as preset_settings


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
    preset: str | None = None
    """A public source's published layout (gsm8k, math, math500, numina_cot, numina_1.5,
    openr1_math, aime, olympiadbench, gpqa, mmlu; factory/stages/presets.py): sets columns,
    answer_from, choice columns and default_domain. Settings the recipe gives itself win."""
    answer_from: str = "column"
    """How the reference is read from the answer column: column (as it is) | boxed (its last
    \\boxed{}) | gsm8k (after "####", thousands separators removed) | regex (answer_pattern's
    first group) | index (a 0-based option number -> its letter) | choice_text (an option's
    text -> its letter). A list (OlympiadBench's final_answer) is joined with ", "."""
    answer_pattern: str | None = None
    """The regex of answer_from: regex (its first group is the reference)."""
    choice_columns: list[str] = field(default_factory=list)
    """Options in separate columns, in order (GPQA): they become `choices`."""
    shuffle_choices: bool = False
    """Shuffle the options by a seeded hash of the question (for sources that list the right one first)."""
    choices_in_question: bool = False
    """Append the options to the question as "(A) ..." lines, so the model sees them."""
    allow_unlabeled: bool = False
    """Keep problems without a reference (reference_source "unlabeled"): grade labels each by
    the majority answer of its traces (grade.unlabeled_min_agreement), or drops it."""


ANSWER_FROM = ("column", "boxed", "gsm8k", "regex", "index", "choice_text")
PLACEHOLDER_ANSWERS = {"proof", "notfound", "not found", "none", "n/a", "na", "null", "-", "?"}
HUB_PREFIX = "hf://"


def resolve(cfg: IngestConfig) -> IngestConfig:
    """`cfg` with its preset's settings filled in where the recipe left a default; checked."""
    import dataclasses

    if cfg.preset is not None:
        defaults = IngestConfig()
        changes = {}
        for key, value in preset_settings(cfg.preset).items():
            mine = getattr(cfg, key)
            if key == "columns":
                changes[key] = {**value, **mine}  # the recipe's own mappings win
            elif mine == getattr(defaults, key):
                changes[key] = value
        cfg = dataclasses.replace(cfg, **changes)
    if cfg.answer_from not in ANSWER_FROM:
        raise ValueError(f"ingest.answer_from={cfg.answer_from!r}; use one of {', '.join(ANSWER_FROM)}")
    if cfg.answer_from == "regex":
        if not cfg.answer_pattern:
            raise ValueError("ingest.answer_from=regex needs ingest.answer_pattern (its first group is the answer)")
        try:
            if re.compile(cfg.answer_pattern).groups < 1:
                raise ValueError(f"ingest.answer_pattern={cfg.answer_pattern!r} has no group: put the answer in ( )")
        except re.error as e:
            raise ValueError(f"ingest.answer_pattern={cfg.answer_pattern!r} is not a regex ({e})") from None
    return cfg


FIELDS = ("problem_id", "question", "answer", "domain", "choices", "source", "split", "level")


@dataclass
class Raw:
    file: str
    row: int  # 1-based line (JSONL, CSV) or record index (JSON, Parquet, datasets)
    record: object
    error: str | None = None  # set when the row itself could not be read (e.g. bad bytes)


def _decode_lines(path: Path) -> Iterator[tuple[int, str | None, bytes]]:
    # line by line from the file: an input of millions of rows is never held whole
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
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
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        yield from _csv_rows(path, csv.DictReader(f))


def _csv_rows(path: Path, reader: csv.DictReader) -> Iterator[Raw]:
    for rec in reader:
        row = reader.line_num
        if any(isinstance(v, str) and re.search(r"[\udc80-\udcff]", v) for v in rec.values()):
            clean = {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v
                     for k, v in rec.items()}
            yield Raw(str(path), row, clean, "invalid_utf8")
        else:
            yield Raw(str(path), row, rec)


def read_table(path: Path, batches: Iterator[pa.RecordBatch]) -> Iterator[Raw]:
    i = 0
    for batch in batches:  # a batch at a time: a big table is never a list of every row
        for rec in batch.to_pylist():
            yield Raw(str(path), i, rec)
            i += 1


def parse_hub(spec: str) -> tuple[str, str | None, str]:
    """hf://owner/name[:config][/split] -> (repo, config, split); split defaults to train."""
    rest = spec[len(HUB_PREFIX):]
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise IngestError(f"{spec}: name a hub dataset as hf://owner/name[:config][/split]")
    owner, name = parts[0], parts[1]
    split = "/".join(parts[2:]) or "train"
    name, _, config = name.partition(":")
    return f"{owner}/{name}", config or None, split


def read_hub(spec: str) -> Iterator[Raw]:
    import datasets

    repo, config, split = parse_hub(spec)
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # noqa: BLE001 - the hub client's errors vary by cause; all end here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise IngestError(f"{spec}: could not load {repo} (config {config}, split {split}) from the hub or the "
                          f"local cache: {first}. Without a network, download it where there is one, or save it "
                          "with Dataset.save_to_disk and give that directory.") from None
    for i, rec in enumerate(ds):
        yield Raw(spec, i, rec)


def read_any(path: Path) -> Iterator[Raw]:
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise IngestError(f"{path}: a DatasetDict; point paths at one split's directory")
        yield from read_table(path, ds.data.table.to_batches(max_chunksize=1024))
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
            f = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise IngestError(f"{path}: not a readable Parquet file ({e})") from None
        yield from read_table(path, f.iter_batches(batch_size=1024))
    else:
        raise IngestError(f"{path}: unknown format {suffix!r} (use .jsonl, .json, .csv, .parquet or a datasets dir)")


def normalize_question(q: str) -> str:
    return re.sub(r"\s+", " ", q).strip().lower()


def content_id(question: str, answer: str) -> str:
    return hashlib.sha256(f"{normalize_question(question)}\x00{answer.strip()}".encode()).hexdigest()[:16]


def _text(v) -> str | None:
    """A cell as text: strings, numbers, and lists of strings (joined by ", ")."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return ", ".join(x.strip().strip("$").strip() for x in v)
    return None


def read_reference(raw_value: str, cfg: IngestConfig, choices: list[str] | None) -> tuple[str | None, str]:
    """(reference or None, how it was read) from the answer column's text."""
    how = cfg.answer_from
    if how == "column":
        return raw_value, "given"
    if how in ("boxed", "gsm8k"):
        return answers.reference_answer(raw_value, how), how
    if how == "regex":
        found = re.findall(cfg.answer_pattern, raw_value)
        last = found[-1] if found else None
        return ((last[0] if isinstance(last, tuple) else last) or "").strip() or None, "regex"
    if how == "index":
        n = raw_value.strip()
        if n.isdigit() and choices and int(n) < len(choices):
            return chr(ord("A") + int(n)), "index"
        return None, "index"
    if how == "choice_text":
        for i, c in enumerate(choices or []):
            if verify.normalize_text(c) == verify.normalize_text(raw_value):
                return chr(ord("A") + i), "choice_text"
        return None, "choice_text"
    raise ValueError(f"ingest.answer_from={how!r}")


def unreadable(reference: str, domain: str, choices: list[str] | None) -> str | None:
    """Why the grader could never read `reference` in `domain`; None when it can."""
    if verify.normalize_text(reference) in PLACEHOLDER_ANSWERS:
        return "a placeholder, not an answer"
    if domain == "math" and verify.is_prose(verify.normalize_math(reference)):
        return "running text, not a final answer"
    if domain == "numeric" and verify.parse_number(reference) is None:
        return "not a number"
    if domain == "choice" and verify.choice_letter(reference, choices) is None:
        return "names none of the options"
    return None


def _shuffled(question: str, options: list[str]) -> list[str]:
    import random

    order = list(options)
    random.Random(hashlib.sha256(normalize_question(question).encode()).digest()).shuffle(order)
    return order


def validate(raw: Raw, cfg: IngestConfig) -> tuple[dict | None, str, str]:
    """One raw record to a problem row, or (None, reason, detail). `cfg` is resolve()d."""
    where = f"{raw.file} row {raw.row}"
    if raw.error:
        reason = raw.error.split(":")[0]
        return None, reason, f"{where}: {raw.error}"
    if not isinstance(raw.record, dict):
        return None, "bad_record", f"{where}: expected an object with question and answer, got {type(raw.record).__name__}"
    rec = raw.record
    col = {f: cfg.columns.get(f, f) for f in FIELDS}
    out: dict = {}
    # the question
    v = rec.get(col["question"])
    if v is None:
        return None, "missing_question", f"{where}: field {col['question']!r} is missing or null"
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return None, "bad_type_question", f"{where}: field {col['question']!r} must be text, got {type(v).__name__}"
    question = str(v).strip()
    if not question:
        return None, "empty_question", f"{where}: field {col['question']!r} is empty"
    # the options: a list column, a JSON list in a CSV cell, or separate columns
    if cfg.choice_columns:
        missing = [c for c in cfg.choice_columns if _text(rec.get(c)) in (None, "")]
        if missing:
            return None, "missing_choices", f"{where}: option column(s) {missing} missing or empty"
        choices = [_text(rec.get(c)).strip() for c in cfg.choice_columns]
    else:
        choices = rec.get(col["choices"])
        if isinstance(choices, str):  # CSV cells: a JSON list
            try:
                choices = json.loads(choices) if choices.strip() else None
            except json.JSONDecodeError:
                return None, "bad_type_choices", f"{where}: field {col['choices']!r} is not a JSON list"
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
            return None, "bad_type_choices", f"{where}: field {col['choices']!r} must be a list of strings"
    if choices and cfg.shuffle_choices:
        choices = _shuffled(question, choices)
    # the reference
    v = rec.get(col["answer"])
    domain = rec.get(col["domain"]) or cfg.default_domain
    if domain not in schema.DOMAINS:
        return None, "bad_domain", f"{where}: field {col['domain']!r} is {domain!r}; use one of {', '.join(schema.DOMAINS)}"
    if v is None or (isinstance(v, str) and not v.strip()):
        if not cfg.allow_unlabeled:
            reason = "missing_answer" if v is None else "empty_answer"
            return None, reason, f"{where}: field {col['answer']!r} is {'missing or null' if v is None else 'empty'}"
        answer, source, answer_raw = None, "unlabeled", None
    elif _text(v) is None:
        return None, "bad_type_answer", f"{where}: field {col['answer']!r} must be text, got {type(v).__name__}"
    else:
        raw_text = _text(v)
        raw_text = raw_text.strip()
        if not raw_text:
            return None, "empty_answer", f"{where}: field {col['answer']!r} is empty"
        answer, source = read_reference(raw_text, cfg, choices)
        answer_raw = raw_text if answer != raw_text or source != "given" else None
        shown = raw_text if len(raw_text) <= 120 else "..." + raw_text[-117:]
        if answer is None:
            return None, "unreadable_reference", (f"{where}: field {col['answer']!r} has no reference to read "
                                                  f"by answer_from={cfg.answer_from}: {shown!r}")
        answer = answer.strip()
        if len(answer) > cfg.max_answer_chars:
            return None, "answer_too_long", (f"{where}: field {col['answer']!r} gives a {len(answer)}-char reference "
                                             f"(max_answer_chars={cfg.max_answer_chars}); a solution? set "
                                             "ingest.answer_from to boxed, gsm8k or regex")
        why = unreadable(answer, domain, choices)
        if why:
            return None, "unreadable_reference", f"{where}: field {col['answer']!r} reference {answer!r} is {why}: {shown!r}"
    if len(question) > cfg.max_question_chars:
        return None, "question_too_long", (f"{where}: field {col['question']!r} has {len(question)} chars "
                                           f"(max_question_chars={cfg.max_question_chars})")
    if choices and cfg.choices_in_question:
        question += "\n\n" + "\n".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices))
    level = rec.get(col["level"])
    if isinstance(level, str):  # CSV cells "3"; MATH's "Level 3"
        m = re.fullmatch(r"\s*(?:level\s*)?(-?\d+)\s*", level, re.I)
        level = int(m.group(1)) if m else (None if not level.strip() or level.strip() == "?" else level)
    if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
        return None, "bad_type_level", f"{where}: field {col['level']!r} must be a whole number, got {level!r}"
    given_id = rec.get(col["problem_id"])
    out.update(
        question=question, answer=answer,
        problem_id=str(given_id) if given_id not in (None, "") else content_id(question, answer or ""),
        domain=domain, choices=choices or None,
        source=str(rec.get(col["source"]) or cfg.default_source
                   or (raw.file if raw.file.startswith(HUB_PREFIX) else Path(raw.file).name)),
        split=str(rec.get(col["split"]) or cfg.default_split), level=level, origin="original",
        answer_raw=answer_raw, reference_source=source,
    )
    return out, "", ""


def ingest(cfg: IngestConfig) -> tuple[pa.Table, pa.Table, list[str]]:
    """Read every path; return (problems, rejected, messages for the user). In memory: for
    tests and small inputs; the pipeline streams `ingest_rows`."""
    rows, rejected, messages = [], [], []
    for row, bad, message in ingest_rows(cfg):
        if row is not None:
            rows.append(row)
        else:
            rejected.append(bad)
            if message:
                messages.append(message)
    return schema.table(rows, schema.PROBLEMS), schema.table(rejected, schema.REJECTED), messages


def ingest_rows(cfg: IngestConfig) -> Iterator[tuple[dict | None, dict | None, str]]:
    """Every input row in input order, as (problem, None, "") or (None, rejected row, message
    for the user: empty for duplicates and rows left out by `sample`).

    Memory is bounded by a row, not the inputs: exact duplicates are found through a 128-bit
    hash of each kept question and of each problem_id, with the kept problem_id (~250 bytes per
    problem in all); `sample` reads the inputs twice, keeping only the `sample` smallest ranks
    in between.
    """
    if not cfg.paths:
        raise IngestError("ingest.paths is empty: name at least one input file")
    cfg = resolve(cfg)
    if cfg.sample is None:
        yield from _unique_rows(cfg)
        return
    rank = lambda r: int.from_bytes(hashlib.sha256(f"{cfg.sample_seed}:{r['problem_id']}".encode()).digest(), "big")  # noqa: E731
    smallest, valid = [], 0  # a max-heap (negated) of the `sample` smallest ranks
    for row, _, _ in _unique_rows(cfg):
        if row is not None:
            valid += 1
            heapq.heappush(smallest, -rank(row))
            if len(smallest) > cfg.sample:
                heapq.heappop(smallest)
    cut = -smallest[0] if smallest and valid > cfg.sample else None
    del smallest
    for row, bad, message in _unique_rows(cfg):
        if row is not None and cut is not None and rank(row) > cut:
            yield None, schema.rejected_row("ingest", "not_sampled", row, f"ingest.sample={cfg.sample} of "
                                            f"{valid} (seed {cfg.sample_seed})", problem_id=row["problem_id"]), ""
        else:
            yield row, bad, message


def _unique_rows(cfg: IngestConfig) -> Iterator[tuple[dict | None, dict | None, str]]:
    """Validated rows of every path, exact-duplicate questions (and repeated ids) rejected."""
    seen: dict[bytes, str] = {}  # hash of a kept question's normalized text -> its problem_id
    ids: set[bytes] = set()  # hashes of the kept problem_ids
    digest = lambda text: hashlib.blake2b(text.encode(), digest_size=16).digest()  # noqa: E731
    for p in cfg.paths:
        if str(p).startswith(HUB_PREFIX):
            raws = read_hub(str(p))
        else:
            path = Path(p)
            if not path.exists():
                raise IngestError(f"{path}: no such file or directory (ingest.paths)")
            raws = read_any(path)
        for raw in raws:
            row, reason, detail = validate(raw, cfg)
            if row is None:
                yield None, schema.rejected_row("ingest", reason, raw.record, detail), detail
                continue
            key, pid = digest(normalize_question(row["question"])), digest(row["problem_id"])
            if key in seen or pid in ids:
                kept = seen.get(key, row["problem_id"])
                yield None, schema.rejected_row(
                    "ingest", "duplicate_question", row,
                    f"{raw.file} row {raw.row}: duplicates problem {kept}", problem_id=row["problem_id"]), ""
                continue
            seen[key] = row["problem_id"]
            ids.add(pid)
            yield row, None, ""
