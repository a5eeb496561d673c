"""`factory demo RECIPE`: the whole loop on the arithmetic domain with the shipped tiny models.

    rollout x8 with the teacher -> grade -> PRM score -> curate (curriculum + DPO pairs)
    -> SFT of the student on the curated shards, in the recipe's order (and, as a control, the
       same SFT for the same number of steps on unfiltered traces: all 8 per problem, right and
       wrong)
    -> DPO from the SFT output -> eval of base / SFT / unfiltered SFT / DPO on held-out problems
    -> report.txt and report.html (plots as inline SVG) in RUN/report/

A demo recipe has one section per product recipe (`pipeline`, `sft`, `dpo`, `eval`) plus
`demo`; paths that tie them together (the run directory, the SFT output DPO starts from, the
model each eval loads) are filled in here, so the sections stay the ordinary recipes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from factory.demo import arith
from factory.engines import make_engine
from factory import config as config_mod, console, schema, store
from factory.training import evaluate
from factory.run import pipeline, products
from factory.run.recipe import Recipe
from factory.run.report import svg_bars
from factory.training import train as train_mod
from prm.evaluate import predicted_first_error, processbench
from prm.steps import SplitConfig, split_steps


@dataclass
class DemoConfig:
    student: str = "data/demo/student"
    """The student base model (SFT starts here)."""
    problems: list[str] = field(default_factory=lambda: ["data/demo/problems/train.jsonl"])
    """Problem files holding each problem's `chain` (for ground-truth step labels)."""
    unfiltered_control: bool = True
    """Also train the same SFT on every trace (right and wrong) and evaluate it."""
    prm_step_threshold: float = 0.5
    """A step scoring under this is predicted wrong (ProcessBench F1 against the ground truth)."""


@dataclass
class DemoRecipe:
    pipeline: Recipe = field(default_factory=Recipe)
    sft: train_mod.SFTRecipe = field(default_factory=train_mod.SFTRecipe)
    dpo: train_mod.DPORecipe = field(default_factory=train_mod.DPORecipe)
    eval: evaluate.EvalRecipe = field(default_factory=evaluate.EvalRecipe)
    demo: DemoConfig = field(default_factory=DemoConfig)


def load_recipe(path, overrides=()) -> DemoRecipe:
    return config_mod.load(DemoRecipe, path, overrides)


def data_key(run_dir: Path) -> dict[str, str]:
    """sha256 of the curriculum and pair shards a run hands to training."""
    m = json.loads((run_dir / "manifest.json").read_text())
    return {f: store.sha256_file(run_dir / f) for f in [s["file"] for s in m["curriculum"]] + list(m["pairs"])}


def model_key(model_dir: str) -> dict[str, str]:
    return {f.name: store.sha256_file(f) for f in sorted(Path(model_dir).glob("*.safetensors"))}


def reuse(out: Path, inputs: dict, finished: str) -> bool:
    """Resume rule for the demo's train and eval steps: `out` is reused when it was made from
    exactly these inputs (config, data and model hashes) and holds `finished`. Otherwise it is
    cleared first, so a model or an eval of older data is never reported for new data; with the
    same inputs an unfinished step keeps its checkpoints."""
    return store.claim_dir(out, store.fingerprint(inputs), {"inputs": inputs}, "demo_inputs.json") \
        and (out / finished).exists()


def unfiltered_run(run: Path, out: Path) -> Path:
    """A run directory whose curriculum is every graded trace (right and wrong), easy -> hard."""
    graded = store.StageDir(run, "grade").read().to_pylist()
    diff = {r["problem_id"]: r for r in pq.read_table(run / "difficulty.parquet").to_pylist()}
    recipe = json.loads((run / "manifest.json").read_text())["config"]["rollout"]
    from factory.stages.rollout import RolloutConfig, prompt_messages

    rcfg = config_mod.from_dict(RolloutConfig, recipe)
    rows = []
    for t in graded:
        d = diff[t["problem_id"]]
        rows.append({**t, **{k: d[k] for k, _ in schema.DIFFICULTY_COLUMNS},
                     "prompt": prompt_messages(t["question"], rcfg),
                     "completion": [{"role": "assistant", "content": t["text"]}]})
    rows.sort(key=lambda r: (r["difficulty"], r["problem_id"], r["trace_id"]))
    return products.write_curriculum_run(out, rows)


def prm_vs_ground_truth(run: Path, cfg: DemoConfig, split: SplitConfig) -> dict:
    """ProcessBench F1 of the score stage's step scores against arith.step_labels."""
    chains = {}
    for p in cfg.problems:
        for line in Path(p).read_text().splitlines():
            r = json.loads(line)
            chains[r["problem_id"]] = r["chain"]
    scored = store.StageDir(run, "score").read().to_pylist()
    labels, preds = [], []
    for t in scored:
        if t["prm_status"] != "ok" or t["problem_id"] not in chains:
            continue
        steps, _ = split_steps(t["reasoning"], split)
        labels.append(arith.step_labels(chains[t["problem_id"]], steps)[1])
        preds.append(predicted_first_error(t["prm_step_scores"], cfg.prm_step_threshold))
    return processbench(labels, preds)


def share_correct(graded: list[dict], key) -> dict:
    """Share of correct traces per value of key(trace), in sorted key order."""
    groups: dict = {}
    for r in graded:
        groups.setdefault(key(r), []).append(r["verdict"] == "correct")
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def pass_by_phrasing(eval_run: Path) -> dict[str, float]:
    """pass@1 (share of correct traces) per phrasing (arith.phrasing of the problem's source)."""
    graded = store.StageDir(eval_run, "grade").read().to_pylist()
    return share_correct(graded, lambda r: arith.phrasing(r["source"]))


def report(run: Path, results: dict[str, dict], phrasing: dict[str, dict], prm: dict,
           seconds: float) -> tuple[str, str]:
    """The printed report and its HTML version."""
    from factory.run.report import histogram, summary

    manifest = json.loads((run / "manifest.json").read_text())
    diff = pq.read_table(run / "difficulty.parquet").to_pylist()
    levels = sorted({r["level"] for r in diff if r["level"] is not None})
    teacher = [sum(r["pass_rate"] for r in diff if r["level"] == lv) / max(1, sum(r["level"] == lv for r in diff))
               for lv in levels]
    overall = sum(r["pass_rate"] for r in diff) / max(1, len(diff))
    scored = store.StageDir(run, "score").read() if (run / "stages" / "score").exists() else None
    means = [m for m in (scored.column("prm_mean").to_pylist() if scored is not None else []) if m is not None]
    bins = [0] * 10
    for m in means:
        bins[min(9, int(m * 10))] += 1
    lines = [f"demo run {run} ({seconds:.0f} s)", "", summary(manifest), "", histogram(run), "",
             "teacher pass@1 by level: " + ", ".join(f"L{lv} {100 * t:.1f}%" for lv, t in zip(levels, teacher))
             + f"  (overall {100 * overall:.1f}%)", "",
             "PRM mean step score (all traces): " + " ".join(f"{b}" for b in bins) + "  (bins of 0.1)",
             f"PRM vs ground-truth step labels: ProcessBench F1 {prm['f1']:.3f} (accuracy {prm['acc_erroneous']:.3f} "
             f"on {prm['erroneous']} erroneous, {prm['acc_correct']:.3f} on {prm['correct']} correct traces)", ""]
    names = list(results)
    metrics = evaluate._metric_names(*results.values())
    lines.append(f"{'student on held-out':<22}" + "".join(f"{m:>9}" for m in metrics))
    for name in names:
        o = results[name]["overall"]
        lines.append(f"{name:<22}" + "".join(f"{100 * o[m]:>8.1f}%" for m in metrics))
    groups = sorted({g for r in results.values() for g in r["groups"]}, key=evaluate._natural)
    lines.append("")
    lines.append(f"{'pass@1 by level':<22}" + "".join(f"{g:>10}" for g in groups))
    for name in names:
        lines.append(f"{name:<22}" + "".join(f"{100 * results[name]['groups'].get(g, {}).get('pass@1', 0):>9.1f}%"
                                             for g in groups))
    styles = sorted({s for r in phrasing.values() for s in r})
    lines += ["", f"{'pass@1 by phrasing':<22}" + "".join(f"{s:>12}" for s in styles)]
    for name in names:
        lines.append(f"{name:<22}" + "".join(f"{100 * phrasing[name].get(s, 0):>11.1f}%" for s in styles))
    text = "\n".join(lines)
    html = ["<html><head><meta charset='utf-8'><title>factory demo</title></head><body>",
            "<h2>factory demo</h2><pre>", text, "</pre>",
            svg_bars("teacher pass@1 by level", [f"L{lv}" for lv in levels], {"teacher": teacher}),
            svg_bars("student pass@1 on held-out, by level", groups,
                      {n: [r["groups"].get(g, {}).get("pass@1", 0) for g in groups] for n, r in results.items()}),
            svg_bars("student pass@1 on held-out, by phrasing", styles,
                      {n: [phrasing[n].get(s, 0) for s in styles] for n in names}),
            svg_bars("PRM mean step score, all traces", [f"{i / 10:.1f}" for i in range(10)],
                      {"traces": bins}, pct=False),
            "</body></html>"]
    return text, "\n".join(html)


def run_demo(recipe: DemoRecipe, log=console.say) -> dict:
    t0 = time.perf_counter()
    run = Path(recipe.pipeline.run.output_dir)
    runner = pipeline.Runner(recipe.pipeline, log=log)
    manifest = runner.run()
    # the teacher's engine, if the run started one, evaluates the students: they share its
    # architecture and tokenizer, so their weights are swapped in instead of starting engines
    engine = runner.started_engine
    student = recipe.demo.student
    trained = {}

    def sft(name: str, run_dir: Path, max_steps: int | None = None) -> str:
        out = run / name
        r = config_mod.from_dict(train_mod.SFTRecipe, config_mod.to_dict(recipe.sft))
        r.model.path, r.data.run_dir, r.train.output_dir = student, str(run_dir), str(out)
        if max_steps:
            r.train.extra = {**r.train.extra, "max_steps": max_steps}
        inputs = {"recipe": config_mod.to_dict(r), "data": data_key(run_dir), "model": model_key(student)}
        if not reuse(out, inputs, "factory_train.json"):
            train_mod.train("sft", r, log=log)
        return str(out)

    trained["student-sft"] = sft("student-sft", run)
    if recipe.demo.unfiltered_control:
        # the same SFT for the same number of steps (same compute) on every trace, right or wrong
        steps = json.loads((run / "student-sft" / "factory_train.json").read_text())["order"]["steps"]
        trained["student-sft-unfiltered"] = sft("student-sft-unfiltered", unfiltered_run(run, run / "unfiltered"),
                                                max_steps=steps)
    dpo_out = run / "student-dpo"
    d = config_mod.from_dict(train_mod.DPORecipe, config_mod.to_dict(recipe.dpo))
    d.model.path = d.dpo.ref_model = trained["student-sft"]
    d.data.run_dir, d.train.output_dir = str(run), str(dpo_out)
    inputs = {"recipe": config_mod.to_dict(d), "data": data_key(run), "model": model_key(d.model.path)}
    if not reuse(dpo_out, inputs, "factory_train.json"):
        train_mod.train("dpo", d, log=log)
    trained["student-dpo"] = str(dpo_out)
    results, phrasing = {}, {}
    try:
        for name, model in [("student-base", student)] + list(trained.items()):
            e = config_mod.from_dict(evaluate.EvalRecipe, config_mod.to_dict(recipe.eval))
            e.engine.model, e.run.output_dir = model, str(run / "eval" / name)
            out = Path(e.run.output_dir)
            if reuse(out, {"recipe": config_mod.to_dict(e), "model": model_key(model)}, "eval.json"):
                results[name] = json.loads((out / "eval.json").read_text())
            else:
                if engine is None:
                    log(f"eval: starting vLLM with {model} ...")
                    engine = make_engine(e.engine, out)
                elif engine.model_name != model:
                    if not hasattr(engine, "load_weights"):  # a server: its weights are not ours to swap
                        raise ValueError("the demo evaluates its students in-process: set pipeline.engine.backend: vllm")
                    engine.load_weights(model)
                results[name] = evaluate.evaluate(e, engine=engine, log=log)
            phrasing[name] = pass_by_phrasing(out)
    finally:
        if engine is not None:
            engine.close()
    prm = prm_vs_ground_truth(run, recipe.demo, recipe.pipeline.score.split) if recipe.pipeline.score else \
        {"f1": float("nan"), "acc_erroneous": float("nan"), "acc_correct": float("nan"), "erroneous": 0, "correct": 0}
    seconds = time.perf_counter() - t0
    text, html = report(run, results, phrasing, prm, seconds)
    (run / "report").mkdir(parents=True, exist_ok=True)
    (run / "report" / "report.txt").write_text(text + "\n")
    (run / "report" / "report.html").write_text(html)
    summary = {"manifest": manifest["stages"], "eval": {n: r["overall"] for n, r in results.items()},
               "eval_groups": {n: r["groups"] for n, r in results.items()}, "eval_phrasings": phrasing,
               "prm_vs_ground_truth": prm,
               "seconds": round(seconds, 1)}
    store.write_json(summary, run / "report" / "report.json")
    log("\n" + text + f"\n\nreport: {run / 'report' / 'report.html'}")
    return summary
