"""The score stage: PRM columns on every trace, and curate's PRM filter inside a pipeline run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from factory.run import pipeline
from factory import schema, store
from prm import tiny
from prm.score import ScoreConfig, score_table
from prm.scorer import PRMConfig, PRMScorer
from prm.steps import SplitConfig

from conftest import load, long_traces, toy_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prm") / "cls"
    tiny.classification_prm(out)
    return out


def graded_rows() -> list[dict]:
    base = {"problem_id": "p", "question": "What is 2 + 2?", "answer": "4", "domain": "numeric",
            "verdict": "correct"}
    return [
        {**base, "trace_id": "a", "reasoning": "2 + 2 = 4.\n\nSo 4."},
        {**base, "trace_id": "b", "reasoning": "2 + 2 = 5.", "verdict": "wrong"},
        {**base, "trace_id": "c", "reasoning": None},
        {**base, "trace_id": "d", "reasoning": "x\n\n" * 300},  # many steps: scored, in windows
        {**base, "trace_id": "e", "reasoning": "ok\n\n" + "x " * 600},  # a step longer than the PRM's context
    ]


def test_score_table_marks_and_never_drops(prm_dir):
    import pyarrow as pa

    graded = pa.Table.from_pylist(graded_rows())
    scorer = PRMScorer(PRMConfig(model=str(prm_dir)))
    cfg = ScoreConfig(prm=PRMConfig(model=str(prm_dir)))
    out, stats = score_table(graded, cfg, scorer)
    rows = out.to_pylist()
    assert [r["trace_id"] for r in rows] == ["a", "b", "c", "d", "e"] and out.column_names[:len(graded.column_names)] == graded.column_names
    a, b, c, d, e = rows
    assert a["prm_status"] == "ok" and a["prm_num_steps"] == 2 and len(a["prm_step_scores"]) == 2
    assert a["prm_mean"] == pytest.approx(sum(a["prm_step_scores"]) / 2)
    assert a["prm_min"] == min(a["prm_step_scores"]) and a["prm_last"] == a["prm_step_scores"][-1]
    assert a["prm_windows"] == 1 and a["prm_min_context_tokens"] is None and a["prm_tokens_read"] == a["prm_num_tokens"]
    assert b["prm_status"] == "ok" and b["prm_num_steps"] == 1  # wrong traces are scored too
    assert c["prm_status"] == "no_reasoning" and c["prm_mean"] is None and c["prm_num_tokens"] is None
    assert d["prm_status"] == "ok" and d["prm_num_steps"] == d["prm_num_unmerged_steps"] == 300
    assert len(d["prm_step_scores"]) == 300 and d["prm_windows"] > 1 and d["prm_min_context_tokens"] > 0
    assert d["prm_num_tokens"] > 512 and d["prm_tokens_read"] <= 1.5 * d["prm_num_tokens"] + 2 * d["prm_windows"]
    # a step longer than the context is read in pieces, and scored at its last
    assert e["prm_status"] == "ok" and e["prm_num_steps"] == 2 and len(e["prm_step_scores"]) == 2
    assert e["prm_cut_steps"] == 1 and e["prm_num_tokens"] > 512 and e["prm_windows"] > 1
    assert a["prm_cut_steps"] == d["prm_cut_steps"] == 0 and c["prm_cut_steps"] is None
    assert all(r["prm_pass"] for r in rows)  # no threshold: nothing fails
    assert stats["prm_status"] == {"ok": 4, "no_reasoning": 1}
    assert stats["prm_tokens"] == {"traces": sum(r["prm_num_tokens"] for r in (a, b, d, e)),
                                   "read": sum(r["prm_tokens_read"] for r in (a, b, d, e)), "windowed": 2}
    # without the cut, that trace is the one left unscored, and says why
    off = PRMConfig(model=str(prm_dir), cut_long_steps=False)
    e_off = score_table(graded, ScoreConfig(prm=off), PRMScorer(off))[0].to_pylist()[4]
    assert e_off["prm_status"] == "step_exceeds_context" and e_off["prm_step_scores"] is None
    # with a threshold between a's and b's means, and unscored traces not kept
    th = (a["prm_mean"] + b["prm_mean"]) / 2
    out2, stats2 = score_table(graded, ScoreConfig(prm=cfg.prm, split=cfg.split, threshold=th), scorer)
    passed = {r["trace_id"]: r["prm_pass"] for r in out2.to_pylist()}
    assert passed["a"] == (a["prm_mean"] >= th) and passed["b"] == (b["prm_mean"] >= th) and passed["a"] != passed["b"]
    assert passed["c"] is False and passed["e"] is False
    assert stats2["prm_fail"] == 3 + (d["prm_mean"] < th)
    assert out2.schema.field("prm_step_scores").type == schema.SCORE_COLUMNS[0][1]


class CountingScorer:
    """A PRMScorer that records how many traces each call hands the PRM."""

    def __init__(self, scorer: PRMScorer):
        self.inner, self.tokenizer, self.calls = scorer, scorer.tokenizer, []

    def score(self, items):
        self.calls.append(len(items))
        return self.inner.score(items)


def test_a_memo_reads_each_trace_once(prm_dir, tmp_path):
    """A shard scored again (a top-up added traces, a threshold changed) sends the PRM only the
    traces its memo lacks; the ones it holds come back exactly as first scored, and repeats of a
    trace within the table are read once."""
    import pyarrow as pa

    from prm.score import Memo

    cfg = ScoreConfig(prm=PRMConfig(model=str(prm_dir)))
    scorer = CountingScorer(PRMScorer(cfg.prm))
    rows = graded_rows()
    first, stats = score_table(pa.Table.from_pylist(rows), cfg, scorer, memo := Memo(tmp_path / "memo.parquet"))
    memo.save()
    assert scorer.calls == [4] and stats["prm_reads"] == {"scored": 4, "from_memo": 0, "repeats": 0}  # c has no reasoning
    new = {**rows[0], "trace_id": "f", "reasoning": "2 + 2 = 4.\n\nThe answer is 4."}
    twin = {**rows[1], "trace_id": "g"}  # b's question and steps again
    again, stats = score_table(pa.Table.from_pylist(rows + [new, twin]), ScoreConfig(prm=cfg.prm, threshold=0.5), scorer,
                               memo := Memo(tmp_path / "memo.parquet"))
    memo.save()
    assert scorer.calls == [4, 1] and stats["prm_reads"] == {"scored": 1, "from_memo": 5, "repeats": 0}
    got = {r["trace_id"]: r for r in again.to_pylist()}
    for r in first.to_pylist():
        assert {k: got[r["trace_id"]][k] for k in r if k != "prm_pass"} == {k: v for k, v in r.items() if k != "prm_pass"}
    assert got["g"]["prm_step_scores"] == got["b"]["prm_step_scores"]
    alone = score_table(pa.Table.from_pylist([new]), cfg, PRMScorer(cfg.prm))[0].to_pylist()[0]
    assert got["f"]["prm_step_scores"] == pytest.approx(alone["prm_step_scores"], abs=1e-6)
    kept = pq.read_table(tmp_path / "memo.parquet")
    assert kept.schema == schema.PRM_MEMO and kept.num_rows == 5  # a, b, d, e, f: the shard's traces, no more
    # a memo that does not hold the table's traces is only a cost: they are all read
    score_table(pa.Table.from_pylist([new]), cfg, scorer, Memo(tmp_path / "other.parquet"))
    assert scorer.calls == [4, 1, 1]


def test_long_demo_traces_get_a_score_for_every_step():
    """Acceptance (issue 26): the demo's likelihood PRM (512 positions) on demo-domain problems
    with 3-300 step reasoning, the longest ~19x its context: every trace with reasoning is
    scored, every step; the ones that fit score exactly as when they are read alone."""
    import pyarrow as pa

    prm = PRMConfig(model=str(ROOT / "data" / "demo" / "prm"), family="likelihood", batch_size=16)
    scorer = PRMScorer(prm)
    rows = [{**{k: v for k, v in r.items() if k != "chain"}, "trace_id": f"t{i}", "verdict": "correct"}
            for i, r in enumerate(long_traces())]
    out, stats = score_table(pa.Table.from_pylist(rows), ScoreConfig(prm=prm), scorer)
    got = out.to_pylist()
    assert stats["prm_status"] == {"ok": len(rows)}
    assert max(r["prm_num_tokens"] for r in got) >= 8 * scorer.max_length == 8 * 512
    for r in got:
        assert len(r["prm_step_scores"]) == r["prm_num_steps"] == r["reasoning"].count("\n\n") + 1
    fits = [r for r in got if r["prm_windows"] == 1]
    assert fits and len(fits) < len(got)
    alone, _ = score_table(pa.Table.from_pylist([r for r in rows if r["trace_id"] in {f["trace_id"] for f in fits}]),
                           ScoreConfig(prm=prm), scorer)
    for f, a in zip(fits, alone.to_pylist()):
        assert f["prm_step_scores"] == pytest.approx(a["prm_step_scores"], abs=1e-4)
    # merging one-line paragraphs: fewer, longer steps, each scored; the count before merging kept
    merged, _ = score_table(pa.Table.from_pylist(rows), ScoreConfig(prm=prm, split=SplitConfig(merge_tokens=64)), scorer)
    for m, r in zip(merged.to_pylist(), got):
        assert m["prm_status"] == "ok" and m["prm_num_unmerged_steps"] == r["prm_num_steps"] >= m["prm_num_steps"]
        assert len(m["prm_step_scores"]) == m["prm_num_steps"]
    assert sum(m["prm_num_steps"] for m in merged.to_pylist()) < sum(r["prm_num_steps"] for r in got)


def test_pipeline_with_a_score_stage(tmp_path, full_run, prm_dir, teacher_dir, problems_file):
    """Copy the finished toy run, add `score:`: rollout and grade are reused, score and curate run."""
    src, plain = full_run
    out = tmp_path / "scored"
    shutil.copytree(src, out)
    data = toy_recipe(out, str(teacher_dir), problems_file)
    data["score"] = {"prm": {"model": str(prm_dir)}}
    first = pipeline.run(load(data), engine=None)  # no engine: rollout must be reused
    graded = store.StageDir(out, "score").read().to_pylist()
    correct = [r for r in graded if r["verdict"] == "correct" and not r["truncated"] and r["format_ok"]]
    means = sorted(r["prm_mean"] for r in correct)
    threshold = means[len(means) // 2]
    data["score"]["threshold"] = threshold
    manifest = pipeline.run(load(data), engine=None)
    assert set(manifest["stages"]) == {"ingest", "rollout", "grade", "score", "curate"}
    # the threshold re-made the score shards, but the PRM read nothing again: every score is the first run's
    reads = first["stages"]["score"]["prm_reads"]
    assert reads["scored"] > 0 and sum(reads.values()) == sum(r["prm_status"] == "ok" for r in graded)
    assert manifest["stages"]["score"]["prm_reads"] == {"scored": 0, "from_memo": sum(reads.values()), "repeats": 0}
    rescored = store.StageDir(out, "score").read().to_pylist()
    assert [(r["trace_id"], r["prm_step_scores"]) for r in rescored] == [(r["trace_id"], r["prm_step_scores"]) for r in graded]
    statuses = manifest["stages"]["score"]["prm_status"]
    assert sum(statuses.values()) == 800 and statuses["ok"] > 700
    assert statuses == {k: sum(r["prm_status"] == k for r in graded) for k in statuses}
    files = [out / s["file"] for s in manifest["curriculum"]]
    cur = pq.ParquetDataset(files).read().to_pylist()
    assert cur and all(r["prm_mean"] >= threshold and len(r["prm_step_scores"]) == r["prm_num_steps"] for r in cur)
    rejected = pq.read_table(out / "rejected" / "curate").to_pylist()
    below = [r for r in rejected if r["drop_reason"] == "prm_below_threshold"]
    assert len(below) == sum(m < threshold for m in means) > 0
    assert all("prm_mean=" in r["detail"] for r in below)
    assert len(cur) + len(rejected) == 800  # every trace is somewhere
    # difficulty is the pass rate over all 8 traces, whatever the PRM says
    before = {r["problem_id"]: r["pass_rate"] for r in pq.read_table(src / "difficulty.parquet").to_pylist()}
    after = {r["problem_id"]: r["pass_rate"] for r in pq.read_table(out / "difficulty.parquet").to_pylist()}
    assert before == after
    assert plain["stages"]["curate"]["out"] > manifest["stages"]["curate"]["out"]
    # another way of reading the PRM clears the memo: every trace is read again
    data["score"]["prm"]["batch_size"] = 3
    assert pipeline.run(load(data), engine=None)["stages"]["score"]["prm_reads"] == reads


def test_prm_score_command_streams_a_run_a_shard_at_a_time(tmp_path, full_run, prm_dir, monkeypatch):
    """`factory prm score`: every graded trace of the run, in order, with the PRM columns, into one
    file, never holding more than a grade shard (reading the whole stage is an error here)."""
    from prm import cli as prm_cli

    src, _ = full_run
    graded = store.StageDir(src, "grade")
    whole = graded.read()
    expected, _ = score_table(whole, ScoreConfig(prm=PRMConfig(model=str(prm_dir))), PRMScorer(PRMConfig(model=str(prm_dir))))

    def whole_run(self):
        raise AssertionError("read the whole stage")

    monkeypatch.setattr(store.StageDir, "read", whole_run)
    out = tmp_path / "out" / "scored.parquet"
    recipe = prm_cli.load_recipe(None, [f"prm.model={prm_dir}", f"score.run_dir={src}", f"score.output={out}"])
    stats = prm_cli.run_command("score", recipe, log=lambda m: None)
    got = pq.read_table(out)
    assert graded.num_shards() > 1 and got.num_rows == whole.num_rows == sum(stats["prm_status"].values())
    assert got.schema == expected.schema
    assert stats["prm_status"] == {k: expected.column("prm_status").to_pylist().count(k)
                                   for k in set(expected.column("prm_status").to_pylist())}
    for a, b in zip(got.to_pylist(), expected.to_pylist()):
        assert a["trace_id"] == b["trace_id"] and a["prm_status"] == b["prm_status"]
        assert a["prm_step_scores"] == (None if b["prm_step_scores"] is None else pytest.approx(b["prm_step_scores"], abs=1e-5))
    assert not list(out.parent.glob(".*tmp*"))  # the temp file was swapped into place
