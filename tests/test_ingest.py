"""Ingest: every format, column mapping, and bad rows rejected with file/row/field while
their valid neighbours reach the output."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.stages.ingest import IngestConfig, IngestError, ingest


def test_malformed_jsonl_keeps_every_valid_row(tmp_path):
    good = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    lines = [json.dumps(good[0]).encode(), b'{"question": "broken", "answer": ', json.dumps(good[1]).encode(),
             json.dumps({"question": "no answer here"}).encode(), json.dumps(good[2]).encode(),
             '{"question": "caf\xe9?", "answer": "1"}'.encode("latin-1"), json.dumps(good[3]).encode(),
             json.dumps({"question": "   ", "answer": "2"}).encode(),
             json.dumps({"question": ["a list"], "answer": "2"}).encode(), json.dumps(good[4]).encode()]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    problems, rejected, messages = ingest(IngestConfig(paths=[str(path)]))
    assert problems.column("question").to_pylist() == [g["question"] for g in good]
    reasons = rejected.column("drop_reason").to_pylist()
    assert reasons == ["invalid_json", "missing_answer", "invalid_utf8", "empty_question", "bad_type_question"]
    assert all(str(path) in m for m in messages)
    assert "row 2" in messages[0] and "row 4" in messages[1] and "'answer'" in messages[1]
    assert "row 6" in messages[2] and "row 8" in messages[3] and "'question'" in messages[3]
    assert all(r for r in rejected.column("record").to_pylist())  # the bad record is kept


def test_unparsable_json_file_names_file_and_line(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text('[\n {"question": "q", "answer": "1"},\n {"question": oops}\n]')
    with pytest.raises(IngestError, match=r"doc\.json:3:"):
        ingest(IngestConfig(paths=[str(path)]))


def test_formats_mapping_limits_and_duplicates(tmp_path):
    rows = [{"problem": "Find x if x + 2 = 5.", "solution": 3, "kind": "math"},
            {"problem": "Pick the prime.", "solution": "B", "kind": "choice", "opts": ["4", "5"]},
            {"problem": "find X if x + 2 = 5. ", "solution": 3, "kind": "math"},  # duplicate question
            {"problem": "Q" * 50, "solution": 1, "kind": "math"},  # too long
            {"problem": "Name it.", "solution": "x", "kind": "essay"}]
    cfg = dict(columns={"question": "problem", "answer": "solution", "domain": "kind", "choices": "opts"},
               max_question_chars=40)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    columnar = [{**{k: v for k, v in r.items() if k != "opts"}, "solution": str(r["solution"])} for r in rows]
    pq.write_table(pa.Table.from_pylist(columnar), tmp_path / "a.parquet")
    datasets.Dataset.from_list(columnar).save_to_disk(tmp_path / "ds")
    with open(tmp_path / "a.csv", "w") as f:
        f.write("problem,solution,kind,opts\n")
        for r in rows:
            opts = json.dumps(r["opts"]).replace('"', '""') if "opts" in r else ""
            f.write(f'"{r["problem"]}",{r["solution"]},{r["kind"]},"{opts}"\n')
    for name in ["a.jsonl", "a.json", "a.parquet", "ds", "a.csv"]:
        problems, rejected, _ = ingest(IngestConfig(paths=[str(tmp_path / name)], **cfg))
        assert problems.column("answer").to_pylist() == ["3", "B"], name
        assert rejected.column("drop_reason").to_pylist() == ["duplicate_question", "question_too_long", "bad_domain"], name
    problems, _, _ = ingest(IngestConfig(paths=[str(tmp_path / "a.jsonl")], **cfg))
    assert problems.column("choices").to_pylist() == [None, ["4", "5"]]
    assert problems.column("source").to_pylist() == ["a.jsonl", "a.jsonl"]
    ids = problems.column("problem_id").to_pylist()
    again, _, _ = ingest(IngestConfig(paths=[str(tmp_path / "a.json")], **cfg))
    assert again.column("problem_id").to_pylist() == ids  # content hash: stable across formats


def test_csv_with_bad_bytes_rejects_only_that_row(tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes(b"question,answer\nWhat is 1+1?,2\nWhat is \xff?,3\nWhat is 2+2?,4\n")
    problems, rejected, messages = ingest(IngestConfig(paths=[str(path)]))
    assert problems.column("answer").to_pylist() == ["2", "4"]
    assert rejected.column("drop_reason").to_pylist() == ["invalid_utf8"] and "row 3" in messages[0]


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        ingest(IngestConfig(paths=[str(tmp_path / "nope.jsonl")]))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(IngestError, match="unknown format"):
        ingest(IngestConfig(paths=[str(tmp_path / "x.txt")]))
