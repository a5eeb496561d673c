"""Rewrite: accept/reject rules of both modes, and the stage inside a pipeline recipe with a
tiny rewriter model (vLLM) and the tiny teacher checking its rewrites."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from factory.stages import grade
from factory.run import pipeline
from factory import tiny, verify
from factory.stages.grade import GradeConfig
from factory.stages.rewrite import RewriteConfig, check_config, decide, equivalences, parse_rewrite, vote
from factory.stages.rollout import request_seed

from conftest import ROOT, load

# ---- the decision rules -------------------------------------------------------------------


def test_vote_clusters_equivalent_answers():
    same = {("1/2", "0.5"): True}
    assert vote(["1/2", "0.5", " 1 / 2", "3", None, None], same) == [("1/2", 3), ("3", 1)]
    assert vote([None, None], {}) == []
    assert vote(["4", "5", "5", "4"], {}) == [("4", 2), ("5", 2)]  # a tie keeps first-seen order


def test_paraphrase_rules():
    # kept only when the majority answer equals the reference
    assert decide("paraphrase", [("7", 5), ("8", 3)], 8, True, 0.6)[0] is None
    assert decide("paraphrase", [("8", 5), ("7", 3)], 8, False, 0.6)[0] == "answer_changed"
    # a weak majority is still a majority for a paraphrase (min_agreement is for variants)
    assert decide("paraphrase", [("7", 2), ("8", 1), ("9", 1)], 8, True, 0.6)[0] is None
    assert decide("paraphrase", [("7", 3), ("8", 3)], 8, True, 0.6)[0] == "no_majority"
    assert decide("paraphrase", [], 8, None, 0.6)[0] == "no_majority"


def test_variant_rules():
    reason, detail = decide("variant", [("12", 5), ("13", 3)], 8, None, 0.6)
    assert reason is None and "12" in detail and "5/8" in detail
    # the denominator is every check rollout, unanswered ones included: 4 of 8 is 0.5
    assert decide("variant", [("12", 4)], 8, None, 0.6)[0] == "low_agreement"
    assert decide("variant", [("12", 5)], 8, None, 0.625)[0] is None
    assert decide("variant", [("12", 4), ("13", 4)], 8, None, 0.5)[0] == "no_majority"


def test_parse_rewrite_and_config():
    assert parse_rewrite("<think>\nlet me vary it\n</think>\nNew problem: What is 5 + 2?") == "What is 5 + 2?"
    assert parse_rewrite('  "What is 5 + 2?" ') == "What is 5 + 2?"
    assert parse_rewrite("**Rewritten question:** Add 5 and 2.") == "Add 5 and 2."
    with pytest.raises(ValueError, match="modes"):
        check_config(RewriteConfig(modes=["summary"]))
    with pytest.raises(ValueError, match="min_agreement"):
        check_config(RewriteConfig(min_agreement=0.0))


def test_equivalences_use_the_grader():
    cfg = GradeConfig(workers=1)
    with grade.make_pool(cfg) as pool:
        same = equivalences([(["\\frac{1}{2}", "0.5", "2", None], "math", None)], cfg, pool)
    assert same == {("\\frac{1}{2}", "0.5"): True, ("\\frac{1}{2}", "2"): False, ("0.5", "2"): False}


# ---- inside a pipeline recipe ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rewriter(tmp_path_factory, engine_config):
    from dataclasses import replace

    from factory.engines.inprocess import VLLMEngine

    path = tiny.build_addition_rewriter(tmp_path_factory.mktemp("models") / "rewriter")
    eng = VLLMEngine(replace(engine_config, model=str(path), enforce_eager=True))  # eager: a faster start
    yield eng
    eng.close()


def same_answer(a: str | None, b: str) -> bool:
    return a is not None and verify.compare(a, b, "numeric") == verify.CORRECT


def majority(answers: list[str | None]) -> tuple[str | None, int, bool]:
    """(answer, votes, unique top) recomputed with the numeric comparison, independently of the stage."""
    groups: list[list[str]] = []
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if same_answer(a, g[0]):
                g.append(a)
                break
        else:
            groups.append([a])
    groups.sort(key=len, reverse=True)
    if not groups:
        return None, 0, False
    return groups[0][0], len(groups[0]), len(groups) == 1 or len(groups[0]) > len(groups[1])


def test_rewrite_dedup_decontam_in_a_recipe(tmp_path, engine, rewriter, teacher_dir):
    data = yaml.safe_load((ROOT / "recipes" / "toy_rewrite.yaml").read_text())
    data["run"] = {"output_dir": str(tmp_path / "run"), "progress": False}
    data["engine"]["model"] = str(teacher_dir)
    data["rewrite"]["model"] = rewriter.model_name
    data["ingest"]["paths"] = [str(ROOT / "data/toy_addition/seed_problems.jsonl")]
    data["decontam"]["benchmarks"][0]["paths"] = [str(ROOT / "data/toy_addition/benchmark.csv")]
    recipe = load(data)
    manifest = pipeline.run(recipe, engine=engine, rewriter=rewriter, log=lambda m: None)
    run = tmp_path / "run"
    stage = pa.concat_tables(pq.read_table(p) for p in sorted((run / "stages" / "rewrite").glob("shard-*.parquet")))
    rows = stage.to_pylist()
    originals = {r["problem_id"]: r for r in rows if r["origin"] == "original"}
    rewrites = [r for r in rows if r["origin"] != "original"]
    rejected = [(r["drop_reason"], json.loads(r["record"])) for r in pq.read_table(run / "rejected" / "rewrite").to_pylist()]
    assert len(originals) == 24

    # every accepted rewrite: a parent among the originals, its split, and the check's outcome on the row
    for r in rewrites:
        parent = originals[r["parent_problem_id"]]
        assert r["split"] == parent["split"] and r["source"] == parent["source"]
        assert len(r["check_answers"]) == recipe.rewrite.check_samples
        top, votes, unique = majority(r["check_answers"])
        assert unique and votes == r["check_votes"] and same_answer(r["check_answer"], top)
        assert r["check_agreement"] == pytest.approx(votes / recipe.rewrite.check_samples)
        if r["origin"] == "paraphrase":
            assert r["answer"] == parent["answer"] and same_answer(top, parent["answer"])
        else:
            assert r["answer"] == r["check_answer"] and r["check_agreement"] >= recipe.rewrite.min_agreement
    # every rejected one: a reason that the recomputed vote confirms
    for reason, rec in rejected:
        assert rec["origin"] in ("paraphrase", "variant") and rec["parent_problem_id"] in originals
        if reason in ("answer_changed", "low_agreement", "no_majority"):
            top, votes, unique = majority(rec["check_answers"])
            if reason == "no_majority":
                assert not unique
            elif reason == "answer_changed":
                assert unique and not same_answer(top, originals[rec["parent_problem_id"]]["answer"])
            else:
                assert unique and votes / recipe.rewrite.check_samples < recipe.rewrite.min_agreement
        else:
            assert reason in ("rewrite_unchanged", "rewrite_empty_question", "rewrite_question_too_long",
                              "check_prompt_too_long")
    counts = manifest["stages"]["rewrite"]["rewrites"]
    for mode in ("paraphrase", "variant"):
        assert counts[f"{mode}_asked"] == 24 * recipe.rewrite.per_problem
        assert counts[f"{mode}_accepted"] == sum(r["origin"] == mode for r in rewrites)
        assert counts[f"{mode}_asked"] == counts[f"{mode}_accepted"] + sum(rec["origin"] == mode for _, rec in rejected)
    assert rewrites and rejected  # the toy rewriter gives both outcomes
    # held-out parents have held-out children (a rewrite of a test problem never trains)
    held_out = {p for p, r in originals.items() if r["split"] == "test"}
    assert {r["split"] for r in rewrites if r["parent_problem_id"] in held_out} <= {"test"}

    # dedup and decontam: the counts are in the manifest and add up
    st = manifest["stages"]
    assert st["dedup"]["in"] == st["rewrite"]["out"] == len(rows)
    assert st["dedup"]["in"] - st["dedup"]["out"] == sum(st["dedup"]["dropped"].values())
    assert st["decontam"]["dropped"].get("contaminated", 0) >= 2  # two seed questions are in the benchmark
    assert st["decontam"]["contaminated_by"]["toy_bench"] == sum(st["decontam"]["dropped"].values())
    assert st["rollout"]["in"] == st["decontam"]["out"]

    # a variant's difficulty comes from the rollout stage's own traces, not the check's votes
    check_seed = request_seed(recipe.rewrite.seed, "rewrite-check")
    traces = pa.concat_tables(pq.read_table(p) for p in sorted((run / "stages" / "rollout").glob("shard-*.parquet")))
    for t in traces.to_pylist():
        if t["origin"] == "variant":
            assert json.loads(t["sampling"])["seed"] != request_seed(check_seed, t["problem_id"])
    curriculum = pa.concat_tables(pq.read_table(p) for p in sorted((run / "curriculum").glob("*.parquet")))
    assert {"origin", "parent_problem_id", "check_agreement"} <= set(curriculum.column_names)
