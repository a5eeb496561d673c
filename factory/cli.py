"""The `factory` command.

    factory run RECIPE [section.key=value ...]   run a recipe's stages (resumes in run.output_dir)
    factory inspect RUN_DIR                       counts, verdicts and the difficulty histogram of a run
    factory train sft|dpo RECIPE [key=value ...]  curriculum SFT / DPO on a run's shards (TRL)
        [--dry-run]                                 check data, lengths, order and TRL arguments; no weights
    factory eval RECIPE [key=value ...]           pass@k / maj@k of a model on held-out problems
    factory eval --compare A B                    two eval results side by side
    factory prm score|label|train|eval|calibrate RECIPE [key=value ...]   process reward models (prm/cli.py)
    factory demo RECIPE [key=value ...]           the whole loop on the shipped tiny models, with a report
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from factory.config import ConfigError
from factory.ingest import IngestError


def summary(manifest: dict) -> str:
    lines = [f"{'stage':<10}{'in':>9}{'out':>9}{'seconds':>10}  dropped / notes"]
    for name, s in manifest["stages"].items():
        notes = ", ".join(f"{k}={v}" for k, v in sorted(s["dropped"].items()))
        if "tokens_per_s" in s:
            notes = f"{s['generated_tokens']} tokens at {s['tokens_per_s']:.0f} tok/s" + (f"; {notes}" if notes else "")
        if "verdicts" in s:
            notes = ", ".join(f"{k}={v}" for k, v in sorted(s["verdicts"].items()))
        if "prm_status" in s:
            notes = "prm_status: " + ", ".join(f"{k}={v}" for k, v in sorted(s["prm_status"].items()))
        if "pairs" in s:
            notes = f"pairs={s['pairs']}; " + notes
        lines.append(f"{name:<10}{s['in']:>9}{s['out']:>9}{s['seconds']:>10.1f}  {notes}")
    return "\n".join(lines)


def histogram(run_dir: Path, bins: int = 8) -> str:
    import pyarrow.parquet as pq

    path = run_dir / "difficulty.parquet"
    if not path.exists():
        return "(no difficulty.parquet yet: the run has not reached curate)"
    rates = pq.read_table(path).column("pass_rate").to_pylist()
    if not rates:
        return "(no problems)"
    counts = [0] * (bins + 1)
    for r in rates:
        counts[min(bins, round(r * bins))] += 1
    width = max(counts)
    lines = [f"pass rate over traces ({len(rates)} problems; difficulty = 1 - pass rate)"]
    for i, c in enumerate(counts):
        lines.append(f"  {i / bins:5.3f} {c:6d} {'#' * round(40 * c / width) if width else ''}")
    return "\n".join(lines)


def inspect(run_dir: Path) -> str:
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: not found; is {run_dir} a finished run directory?")
    manifest = json.loads(manifest_path.read_text())
    shards = "\n".join(f"  {s['file']}: {s['rows']} rows, difficulty {s['difficulty_min']}..{s['difficulty_max']}"
                       for s in manifest["curriculum"])
    return f"{summary(manifest)}\n\ncurriculum shards (easy -> hard):\n{shards}\n\n{histogram(run_dir)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="factory", description="reasoning-trace distillation data factory")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run a recipe's stages")
    p_run.add_argument("recipe")
    p_run.add_argument("overrides", nargs="*", help="section.key=value")
    p_inspect = sub.add_parser("inspect", help="print a run's counts and difficulty histogram")
    p_inspect.add_argument("run_dir", type=Path)
    p_train = sub.add_parser("train", help="curriculum SFT or DPO on a run's shards")
    p_train.add_argument("kind", choices=["sft", "dpo"])
    p_train.add_argument("recipe")
    p_train.add_argument("overrides", nargs="*", help="section.key=value")
    p_train.add_argument("--dry-run", action="store_true",
                         help="read data, measure lengths, plan the order, build TRL's config; load no weights")
    p_eval = sub.add_parser("eval", help="pass@k / maj@k of a model on held-out problems")
    p_eval.add_argument("recipe", nargs="?")
    p_eval.add_argument("overrides", nargs="*", help="section.key=value")
    p_eval.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two eval.json files (or their dirs)")
    p_prm = sub.add_parser("prm", help="PRM: score traces, Monte-Carlo labels, train, ProcessBench eval, calibrate")
    p_prm.add_argument("prm_cmd", choices=["score", "label", "train", "eval", "calibrate"])
    p_prm.add_argument("recipe")
    p_prm.add_argument("overrides", nargs="*", help="section.key=value")
    p_demo = sub.add_parser("demo", help="the whole loop on the shipped tiny models, with a report")
    p_demo.add_argument("recipe")
    p_demo.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "run":
            from factory.pipeline import load_recipe, run

            recipe = load_recipe(args.recipe, args.overrides)
            manifest = run(recipe)
            print("\n" + summary(manifest))
            print(f"\nwrote {recipe.run.output_dir}/{{curriculum,pairs,rejected}}/ and manifest.json")
        elif args.cmd == "inspect":
            print(inspect(args.run_dir))
        elif args.cmd == "train":
            from factory import train

            recipe = train.load_recipe(args.kind, args.recipe, args.overrides)
            report = train.train(args.kind, recipe, dry_run=args.dry_run)
            if args.dry_run:
                print(json.dumps({k: report[k] for k in ("lengths", "order", "data")}, indent=2))
        elif args.cmd == "eval":
            from factory import evaluate

            if args.compare:
                print(evaluate.compare(*(evaluate.read_result(p) for p in args.compare)))
            elif not args.recipe:
                parser.error("eval needs a RECIPE (or --compare A B)")
            else:
                result = evaluate.evaluate(evaluate.load_recipe(args.recipe, args.overrides))
                print("\n" + evaluate.table(result))
        elif args.cmd == "demo":
            from factory import demo

            demo.run_demo(demo.load_recipe(args.recipe, args.overrides))
        elif args.cmd == "prm":
            from prm import cli as prm_cli

            prm_cli.run_command(args.prm_cmd, prm_cli.load_recipe(args.recipe, args.overrides))
    except (ConfigError, IngestError, FileNotFoundError, ValueError) as e:
        print(f"factory: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
