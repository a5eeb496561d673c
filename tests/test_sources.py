"""Real sources in their published layouts: presets, reference extraction at ingest, hub names,
and problems without a reference labelled by the majority of their traces."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from factory.stages.ingest import IngestConfig, IngestError, ingest, parse_hub
from factory.stages.presets import PRESETS

from test_continuous import ROOT, recipe_data, sim  # noqa: F401  (the simulated teacher fixture)

# A few rows per source, written from each dataset's documented columns (our own problems).
LAYOUTS = {
    "gsm8k": ([
        {"question": "Ada has 12 pens and buys 7 more. How many pens does she have?",
         "answer": "She has 12 + 7 = <<12+7=19>>19 pens.\n#### 19"},
        {"question": "A farm sells 1,250 eggs a day. How many in 2 days?",
         "answer": "In two days it sells 1,250 * 2 = <<1250*2=2500>>2,500 eggs.\n#### 2,500"},
        {"question": "A rationale with no final line?", "answer": "She has 3 + 4 = 7 pens."},
    ], ["19", "2500"], ["unreadable_reference"]),
    "math": ([
        {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "level": "Level 2", "type": "Prealgebra",
         "solution": "We have $\\frac{1}{2} + \\frac{1}{4} = \\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$."},
        {"problem": "Find the area of a square of side 10.", "level": "Level 1", "type": "Geometry",
         "solution": "The area is $10^2 = \\boxed{100\\text{ square units}}$."},
        {"problem": "Prove that the sum of two even numbers is even.", "level": "Level 5", "type": "Number Theory",
         "solution": "Write them as $2a$ and $2b$; their sum $2(a+b)$ is even."},
    ], ["\\frac{3}{4}", "100\\text{ square units}"], ["unreadable_reference"]),
    "math500": ([
        {"problem": "Compute $3 \\cdot 7$.", "solution": "$3 \\cdot 7 = \\boxed{21}$.", "answer": "21",
         "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/17.json"},
    ], ["21"], []),
    "numina_cot": ([
        {"source": "olympiads", "problem": "How many divisors does 12 have?",
         "solution": "The divisors are 1, 2, 3, 4, 6 and 12, so there are $\\boxed{6}$.",
         "messages": [{"role": "user", "content": "How many divisors does 12 have?"}]},
    ], ["6"], []),
    "numina_1.5": ([
        {"problem": "Solve $4x = 3$.", "solution": "$x = \\frac{3}{4}$", "answer": "\\frac{3}{4}",
         "problem_type": "Algebra", "question_type": "math-word-problem", "source": "cn_contest"},
        {"problem": "Show that 7 is prime.", "solution": "It has no divisor between 2 and 6.", "answer": "proof",
         "problem_type": "Number Theory", "question_type": "proof", "source": "olympiads"},
    ], ["\\frac{3}{4}"], ["unreadable_reference"]),
    "openr1_math": ([
        {"problem": "What is $2^5$?", "solution": "$2^5 = 32$.", "answer": "32", "problem_type": "Algebra",
         "question_type": "math-word-problem", "source": "olympiads", "uuid": "5a1c-0001",
         "generations": ["<think>2^5 = 32</think> \\boxed{32}"], "correctness_math_verify": [True]},
    ], ["32"], []),
    "aime": ([
        {"id": 60, "problem": "Find the remainder when $2^{10}$ is divided by 1000.", "solution": "1024 mod 1000.",
         "answer": 24, "url": "https://example.org/aime/60"},
    ], ["24"], []),
    "olympiadbench": ([
        {"id": 1606, "question": "Find the smallest positive $x$ with $2x = 1$.", "solution": ["$x = 1/2$."],
         "final_answer": ["$\\frac{1}{2}$"], "is_multiple_answer": False, "unit": None, "answer_type": "Numerical"},
        {"id": 1607, "question": "Find all primes $p$ with $p^2 - 8p + 15 = 0$.", "solution": ["It factors."],
         "final_answer": ["$3$", "$5$"], "is_multiple_answer": True, "unit": None, "answer_type": "Numerical"},
    ], ["\\frac{1}{2}", "3, 5"], []),
    "gpqa": ([
        {"Question": "Which particle carries no electric charge?", "Correct Answer": "neutron",
         "Incorrect Answer 1": "proton", "Incorrect Answer 2": "electron", "Incorrect Answer 3": "positron",
         "Subdomain": "Physics"},
    ], None, []),
    "mmlu": ([
        {"question": "What is the chemical symbol of gold?", "subject": "chemistry",
         "choices": ["Ag", "Fe", "Au", "Pb"], "answer": 2},
        {"question": "An index out of range?", "subject": "chemistry", "choices": ["a", "b"], "answer": 5},
    ], ["C"], ["unreadable_reference"]),
}


def test_every_preset_has_a_layout_here():
    assert set(LAYOUTS) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_preset_reads_the_published_layout(tmp_path, name):
    rows, references, reasons = LAYOUTS[name]
    path = tmp_path / f"{name}.parquet"
    if name == "aime":  # integer answers, as in the published Parquet
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems, rejected, messages = ingest(IngestConfig(paths=[str(path)], preset=name))
    got = problems.to_pylist()
    assert [r["reference_source"] for r in got] == \
        [{"gsm8k": "gsm8k", "math": "boxed", "numina_cot": "boxed", "gpqa": "choice_text", "mmlu": "index"}
         .get(name, "given")] * len(got)
    assert rejected.column("drop_reason").to_pylist() == reasons
    assert all(str(path) in m and "row" in m for m in messages)
    if name == "gpqa":
        (p,) = got
        letter = p["answer"]
        assert p["choices"][ord(letter) - ord("A")] == "neutron" and sorted(p["choices"]) == \
            ["electron", "neutron", "positron", "proton"]
        assert f"({letter}) neutron" in p["question"]  # the options are in the prompt
        return
    assert [r["answer"] for r in got] == references
    if name in ("gsm8k", "math", "numina_cot"):  # the column as published is kept beside the reference
        assert [r["answer_raw"] for r in got] == [rows[i][PRESETS[name]["columns"]["answer"]] for i in range(len(got))]
    if name == "math":
        assert [r["level"] for r in got] == [2, 1]
    if name == "mmlu":
        assert got[0]["question"].endswith("(A) Ag\n(B) Fe\n(C) Au\n(D) Pb")


def test_gpqa_shuffle_is_seeded_by_the_question(tmp_path):
    rows = [{"Question": f"Question {i}?", "Correct Answer": "right", "Incorrect Answer 1": "w1",
             "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"} for i in range(40)]
    path = tmp_path / "gpqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = ingest(IngestConfig(paths=[str(path)], preset="gpqa"))[0].column("answer").to_pylist()
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    again = ingest(IngestConfig(paths=[str(path)], preset="gpqa"))[0].column("answer").to_pylist()
    assert first == list(reversed(again))  # the same letter per question, whatever the file order
    assert len(set(first)) == 4  # the right option is not always A


def test_without_a_preset_a_solution_column_is_rejected_with_a_hint(tmp_path):
    rows, _, _ = LAYOUTS["gsm8k"]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems, rejected, messages = ingest(IngestConfig(paths=[str(path)], max_answer_chars=20))
    assert problems.num_rows == 0 and set(rejected.column("drop_reason").to_pylist()) == {"answer_too_long"}
    assert "answer_from" in messages[0]


def test_regex_and_recipe_settings_over_the_preset(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"q": "What is 6 * 7?", "sol": "six sevens... ANSWER: 42"}) + "\n"
                    + json.dumps({"q": "What is 5 * 5?", "sol": "no marker here"}) + "\n")
    cfg = IngestConfig(paths=[str(path)], columns={"question": "q", "answer": "sol"}, answer_from="regex",
                       answer_pattern=r"ANSWER:\s*(\S+)")
    problems, rejected, messages = ingest(cfg)
    assert problems.column("answer").to_pylist() == ["42"]
    assert rejected.column("drop_reason").to_pylist() == ["unreadable_reference"]
    assert "no marker here" in messages[0] and "row 2" in messages[0]
    with pytest.raises(ValueError, match="answer_pattern"):
        ingest(IngestConfig(paths=[str(path)], answer_from="regex"))
    with pytest.raises(ValueError, match="no group"):
        ingest(IngestConfig(paths=[str(path)], answer_from="regex", answer_pattern="ANSWER"))
    with pytest.raises(ValueError, match="ingest.preset='gsm9k'"):
        ingest(IngestConfig(paths=[str(path)], preset="gsm9k"))
    # the recipe's own column mapping wins over the preset's
    path.write_text(json.dumps({"q": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    got = ingest(IngestConfig(paths=[str(path)], preset="gsm8k", columns={"question": "q"}))[0].to_pylist()
    assert [(r["question"], r["answer"]) for r in got] == [("What is 1 + 1?", "2")]


def test_unreadable_references_per_domain(tmp_path):
    rows = [{"question": "q1", "answer": "see the solution above"}, {"question": "q2", "answer": "n/a"},
            {"question": "q3", "answer": "x^2 + 1"}, {"question": "q4", "answer": "twelve", "domain": "numeric"},
            {"question": "q5", "answer": "12", "domain": "numeric"},
            {"question": "q6", "answer": "Berlin", "domain": "choice", "choices": ["Paris", "Rome"]}]
    path = tmp_path / "refs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems, rejected, messages = ingest(IngestConfig(paths=[str(path)]))
    assert problems.column("question").to_pylist() == ["q3", "q5"]
    assert rejected.column("drop_reason").to_pylist() == ["unreadable_reference"] * 4
    assert "'see the solution above'" in messages[0] and "running text" in messages[0]
    assert "placeholder" in messages[1] and "not a number" in messages[2] and "none of the options" in messages[3]


def test_hub_names_parse_and_fail_clearly_offline(tmp_path, monkeypatch):
    assert parse_hub("hf://openai/gsm8k:main/test") == ("openai/gsm8k", "main", "test")
    assert parse_hub("hf://HuggingFaceH4/MATH-500") == ("HuggingFaceH4/MATH-500", None, "train")
    with pytest.raises(IngestError, match="hf://owner/name"):
        parse_hub("hf://gsm8k")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    with pytest.raises(IngestError, match=r"hf://openai/gsm8k:main/test: could not load openai/gsm8k .*cache"):
        ingest(IngestConfig(paths=["hf://openai/gsm8k:main/test"], preset="gsm8k"))


def test_hub_rows_go_through_the_preset(monkeypatch):
    """The hub itself is never reached in tests: datasets.load_dataset stands in with the rows a
    GSM8K split has, and the loader must ask it for the right repo, config and split."""
    asked = []

    def load_dataset(repo, config=None, split=None):
        asked.append((repo, config, split))
        return datasets.Dataset.from_list(LAYOUTS["gsm8k"][0][:2])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    problems, _, _ = ingest(IngestConfig(paths=["hf://openai/gsm8k:main/test"], preset="gsm8k"))
    assert asked == [("openai/gsm8k", "main", "test")]
    assert problems.column("answer").to_pylist() == ["19", "2500"]
    assert problems.column("source").to_pylist() == ["hf://openai/gsm8k:main/test"] * 2


def test_unlabeled_problems_get_majority_references(tmp_path, sim):  # noqa: F811
    """The simulated teacher answers each problem right with its own probability p and wrong
    with a fixed other number, so a majority label exists, and is the truth when p > 1/2."""
    truth = {}
    rows = []
    for i in range(24):
        a, b = 10 + i, 3 * i
        q = f"What is {a} + {b}?"
        truth[q] = str(a + b)
        rows.append({"question": q} if i % 2 else {"question": q, "answer": ""})  # missing or empty
    rows.append({"question": "What is 1 + 1?", "answer": "2"})  # a labelled neighbour
    problems = tmp_path / "unlabeled.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    data = recipe_data(run, sim, problems, ingest={"allow_unlabeled": True},
                       rollout={"num_traces": 8, "max_tokens": 2000})
    data["grade"]["unlabeled_min_agreement"] = 0.75
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    from factory import cli

    assert cli.main(["run", str(recipe)]) == 0
    graded = [r for f in sorted((run / "stages" / "grade").glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()]
    by_problem: dict[str, list[dict]] = {}
    for r in graded:
        by_problem.setdefault(r["question"], []).append(r)
    assert by_problem["What is 1 + 1?"][0]["reference_source"] == "given"
    labelled = {q: ts for q, ts in by_problem.items() if ts[0]["reference_source"] == "majority"}
    rejected = [r for f in (run / "rejected" / "grade").glob("*.parquet") for r in pq.read_table(f).to_pylist()]
    dropped = {json.loads(r["record"])["question"]: r for r in rejected}
    assert labelled and dropped and set(labelled) | set(dropped) == set(truth)
    for q, ts in labelled.items():
        agreement = ts[0]["reference_agreement"]
        assert agreement >= 0.75 and len(ts) == 8
        extracted = [t["extracted_answer"] for t in ts]
        assert extracted.count(ts[0]["answer"]) == round(agreement * 8)  # the majority, and its share
        assert sum(t["verdict"] == "correct" for t in ts) == round(agreement * 8)
    for q, r in dropped.items():
        assert r["drop_reason"] in ("low_agreement", "no_majority") and json.loads(r["record"])["reference_agreement"] < 0.75
        assert re.search(r"'\d+' x\d", r["detail"])  # the answers and their votes
    # the simulated teacher gives the truth or one wrong number: a majority label is one of them
    # (a confidently wrong teacher labels wrongly: the agreement measures consistency, not accuracy)
    assert all(ts[0]["answer"] in (truth[q], str(int(truth[q]) + 1)) for q, ts in labelled.items())
    manifest = json.loads((run / "manifest.json").read_text())
    grade_counts = manifest["stages"]["grade"]
    assert grade_counts["unlabeled"]["labelled"] == len(labelled)
    assert grade_counts["unlabeled"]["low_agreement"] + grade_counts["unlabeled"]["no_majority"] == len(dropped)
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["drop_reason"]] = reasons.get(r["drop_reason"], 0) + 1
    assert grade_counts["dropped"] == reasons and sum(reasons.values()) == 8 * len(dropped)
