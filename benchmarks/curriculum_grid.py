"""Curriculum orders x top-up on the demo domain: held-out pass@1 overall and per level, mean and
spread over training seeds on the same data, and the teacher tokens each dataset cost.

    python benchmarks/curriculum_grid.py --orders shuffled,pacing,staged,replay,hard_weighted --seeds 0,1,2
    python benchmarks/curriculum_grid.py --data topup --orders shuffled,replay --seeds 0,1,2
    python benchmarks/curriculum_grid.py --orders replay,shuffled,shuffled_long   # replay vs its extra steps

Needs a finished demo run (`make demo`: runs/demo). `--data topup` first makes runs/demo_topup:
the demo run's ingest, rollout and grade stages copied (so its first K = 8 traces are the very
same), then the top-up stage (TOPUP below) and score / curate again. Each cell is the demo's SFT
(recipes/demo.yaml's `sft` section: lr, batch, epochs, length grouping) with the order's
settings, train.seed and order.seed = the seed, evaluated at the demo's eval settings (300
held-out problems x 4 samples, temperature 1) on one vLLM engine whose weights are swapped per
student. Every cell resumes like the demo's steps (same inputs: reused). Results accumulate in
OUT/grid.json; the last line printed is the JSON summary of every cell run so far.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from factory import config as config_mod
from factory.demo import data_key, load_recipe, model_key, reuse
from factory.engines import make_engine
from factory.run import pipeline
from factory.run.recipe import Recipe
from factory.stages.topup import TopupConfig
from factory.training import evaluate, train as train_mod

# the orders measured; every one sees the data for about 2 epochs (replay adds its replays)
ORDERS = {
    "shuffled": {"strategy": "shuffled", "epochs": 2},
    "pacing": {"strategy": "pacing", "epochs": 2, "initial_competence": 0.3},  # the demo's default before
    "sorted": {"strategy": "sorted", "epochs": 2},
    # Light-R1's two stages: everything once, then the harder half (difficulty >= 0.375) twice: ~2.0 epochs
    "staged": {"strategy": "staged", "epochs": 2, "stages": [{"min_difficulty": 0.0, "epochs": 1, "shuffle": True},
                                                 {"min_difficulty": 0.375, "epochs": 2, "shuffle": True}]},
    "replay": {"strategy": "replay", "epochs": 2, "buckets": 4, "replay": 0.25},
    "hard_weighted": {"strategy": "hard_weighted", "epochs": 2, "hard_weight": 1.0},
    # the control for replay's extra examples: shuffled for exactly as many steps as replay takes on
    # the same data (a third pass cut short by train.extra.max_steps, which TRL's schedule follows)
    "shuffled_long": {"strategy": "shuffled", "epochs": 3},
}
SAME_STEPS_AS = {"shuffled_long": "replay"}
# the top-up measured: problems that 1 or 2 of their 8 traces solved get waves of 4 more samples
# until 4 correct or 16 samples (two waves at most); curate keeps up to 4 of their correct traces.
# Sized to the +30% token budget: those problems' traces are 52 tokens long against 44 on average
TOPUP = TopupConfig(min_pass_rate=0.0, max_pass_rate=0.25, target_correct=4, wave_size=4, max_samples=16)
TOPUP_MAX_TRACES = 4
HARD = ("level 4", "level 5", "level 6")  # the top-up's acceptance: pass@1 on these, pooled


def topup_run(recipe, demo_run: Path, out: Path, log) -> tuple[Path, object]:
    """runs/demo_topup: the demo run's first three stages, then the top-up, score and curate."""
    for stage in ("ingest", "rollout", "grade"):
        if not (out / "stages" / stage).exists():
            shutil.copytree(demo_run / "stages" / stage, out / "stages" / stage)
    p = config_mod.from_dict(Recipe, config_mod.to_dict(recipe.pipeline))
    p.run.output_dir, p.run.progress = str(out), False
    p.topup = TOPUP
    p.curate.max_traces_topped_up = TOPUP_MAX_TRACES
    runner = pipeline.Runner(p, log=log)
    runner.run()
    return out, runner.started_engine


def cell_recipe(recipe, run_dir: Path, order: str, seed: int, out: Path) -> train_mod.SFTRecipe:
    r = config_mod.from_dict(train_mod.SFTRecipe, config_mod.to_dict(recipe.sft))
    r.model.path, r.data.run_dir, r.train.output_dir = recipe.demo.student, str(run_dir), str(out)
    r.data.order = config_mod.from_dict(type(r.data.order), {**config_mod.to_dict(r.data.order), **ORDERS[order],
                                                             "seed": seed})
    r.train.seed = seed
    if order in SAME_STEPS_AS:  # as many steps as that order's plan on the same data and seed
        other = train_mod.plan("sft", cell_recipe(recipe, run_dir, SAME_STEPS_AS[order], seed, out), log=lambda m: None)
        r.train.extra = {**r.train.extra, "max_steps": other.report["order"]["steps"]}
    return r


def sft_cell(recipe, run_dir: Path, order: str, seed: int, out: Path, log) -> dict:
    r = cell_recipe(recipe, run_dir, order, seed, out)
    inputs = {"recipe": config_mod.to_dict(r), "data": data_key(run_dir), "model": model_key(recipe.demo.student)}
    if not reuse(out, inputs, "factory_train.json"):
        # in a process of its own: vLLM, once started here, drops this process to one torch thread
        child = multiprocessing.get_context("spawn").Process(target=_train, args=(config_mod.to_dict(r),))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"SFT of {out} failed (exit code {child.exitcode})")
    return json.loads((out / "factory_train.json").read_text())


def _train(recipe: dict) -> None:
    train_mod.train("sft", config_mod.from_dict(train_mod.SFTRecipe, recipe), log=lambda m: None)


def eval_cell(recipe, model: str, out: Path, engine, log) -> tuple[dict, object]:
    e = config_mod.from_dict(evaluate.EvalRecipe, config_mod.to_dict(recipe.eval))
    e.engine.model, e.run.output_dir, e.run.progress = model, str(out), False
    if reuse(out, {"recipe": config_mod.to_dict(e), "model": model_key(model)}, "eval.json"):
        return json.loads((out / "eval.json").read_text()), engine
    if engine is None:
        engine = make_engine(e.engine, out)
    elif engine.model_name != model:
        engine.load_weights(model)
    return evaluate.evaluate(e, engine=engine, log=log), engine


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(cells: list[dict], base: dict, tokens: dict) -> dict:
    out = {"base": {"pass@1": base["overall"]["pass@1"], "levels": {g: m["pass@1"] for g, m in base["groups"].items()}},
           "tokens": tokens, "cells": {}}
    keys = sorted({(c["data"], c["order"]) for c in cells})
    for data, order in keys:
        mine = [c for c in cells if c["data"] == data and c["order"] == order]
        levels = sorted({g for c in mine for g in c["levels"]}, key=evaluate._natural)
        out["cells"][f"{data}/{order}"] = {
            "seeds": [c["seed"] for c in mine], "steps": mine[0]["steps"], "rows": mine[0]["rows"],
            "pass@1": spread([c["pass@1"] for c in mine]),
            "levels": {g: spread([c["levels"][g] for c in mine]) for g in levels},
            "levels_4_6": spread([c["levels_4_6"] for c in mine])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/demo.yaml")
    ap.add_argument("--data", default="plain", choices=["plain", "topup"])
    ap.add_argument("--orders", default=",".join(ORDERS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("runs/curriculum_grid"))
    ap.add_argument("--base-eval", type=Path, default=Path("runs/curriculum_grid/base"),
                    help="where the base student's eval goes (shared by grids over other data)")
    ap.add_argument("--table", type=Path, nargs="+", metavar="OUT",
                    help="print the markdown table (and JSON summary) of these grids' cells, merged, and exit")
    args = ap.parse_args()
    if args.table:
        return print_table(args.table)
    log = lambda m: None  # noqa: E731
    recipe = load_recipe(args.recipe)
    demo_run = Path(recipe.pipeline.run.output_dir)
    if not (demo_run / "manifest.json").exists():
        raise SystemExit(f"{demo_run}: no finished demo run; run `make demo` first")
    engine = None
    run_dir = demo_run
    if args.data == "topup":
        run_dir, engine = topup_run(recipe, demo_run, demo_run.with_name(demo_run.name + "_topup"), log)
    args.out.mkdir(parents=True, exist_ok=True)
    grid_path = args.out / "grid.json"
    grid = json.loads(grid_path.read_text()) if grid_path.exists() else {"cells": []}
    try:
        base, engine = eval_cell(recipe, recipe.demo.student, args.base_eval, engine, log)
        tokens = {}
        for name, d in (("plain", demo_run), ("topup", demo_run.with_name(demo_run.name + "_topup"))):
            if (d / "manifest.json").exists():
                m = json.loads((d / "manifest.json").read_text())
                tokens[name] = {**m["tokens"], "curriculum_rows": sum(s["rows"] for s in m["curriculum"]),
                                "topup_counts": m["stages"].get("topup", {}).get("topup")}
        # seed by seed over every order, so a grid cut short still compares the orders on equal seeds
        for seed in map(int, args.seeds.split(",")):
            for order in args.orders.split(","):
                t0 = time.perf_counter()
                cell = args.out / args.data / f"{order}-s{seed}"
                report = sft_cell(recipe, run_dir, order, seed, cell / "model", log)
                result, engine = eval_cell(recipe, str(cell / "model"), cell / "eval", engine, log)
                g = result["groups"]
                row = {"data": args.data, "order": order, "seed": seed, "pass@1": result["overall"]["pass@1"],
                       "levels": {k: v["pass@1"] for k, v in g.items()},
                       "levels_4_6": sum(g[k]["pass@1"] * g[k]["problems"] for k in HARD if k in g)
                       / sum(g[k]["problems"] for k in HARD if k in g),
                       "steps": report["order"]["steps"], "rows": report["lengths"]["rows"],
                       "seconds": round(time.perf_counter() - t0, 1)}
                grid["cells"] = [c for c in grid["cells"] if (c["data"], c["order"], c["seed"]) != (args.data, order, seed)]
                grid["cells"].append(row)
                grid.update(summary=summarize(grid["cells"], base, tokens), cpu=cpu_model(),
                            dtype=engine_dtype(engine, demo_run))
                grid_path.write_text(json.dumps(grid, indent=1))
                print(json.dumps(row), flush=True)
    finally:
        if engine is not None:
            engine.close()
    print(json.dumps(grid["summary"]))


def print_table(outs: list[Path]) -> None:
    """Several grids (e.g. run side by side, one per order) as one table: mean ± sd over seeds."""
    grids = [json.loads((o / "grid.json").read_text()) for o in outs if (o / "grid.json").exists()]
    cells = [c for g in grids for c in g["cells"]]
    s = summarize(cells, {"overall": {"pass@1": grids[0]["summary"]["base"]["pass@1"]},
                          "groups": {k: {"pass@1": v} for k, v in grids[0]["summary"]["base"]["levels"].items()}},
                  {k: v for g in grids for k, v in g["summary"]["tokens"].items()})
    levels = sorted(s["base"]["levels"], key=evaluate._natural)
    pm = lambda x: f"{100 * x['mean']:.1f} ± {100 * (x['sd'] or 0):.1f}"  # noqa: E731
    print(f"CPU: {grids[0]['cpu']}; eval engine dtype: {grids[0]['dtype']}")
    print("| data | order | seeds | steps | pass@1 | " + " | ".join(levels) + " | levels 4-6 | teacher tokens |")
    print("|---|---|---|---|---|" + "---|" * len(levels) + "---|---|")
    print("| - | base student | - | - | " + f"{100 * s['base']['pass@1']:.1f} | "
          + " | ".join(f"{100 * s['base']['levels'][g]:.1f}" for g in levels) + " | | |")
    for key, c in s["cells"].items():
        data, order = key.split("/")
        t = s["tokens"].get(data, {})
        print(f"| {data} | {order} | {len(c['seeds'])} | {c['steps']} | {pm(c['pass@1'])} | "
              + " | ".join(pm(c["levels"][g]) for g in levels) + f" | {pm(c['levels_4_6'])} | "
              + f"{t.get('completion', 0):,} |")
    print(json.dumps(s))


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "unknown")


def engine_dtype(engine, demo_run: Path) -> str:
    m = json.loads((demo_run / "manifest.json").read_text())
    return (vars(engine).get("dtype") if engine is not None else None) or m.get("engine", {}).get("dtype", "unknown")


if __name__ == "__main__":
    main()
