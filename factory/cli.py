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
from factory.run.report import inspect, summary
from factory.stages.ingest import IngestError


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
            from factory.run.pipeline import load_recipe, run

            recipe = load_recipe(args.recipe, args.overrides)
            manifest = run(recipe)
            print("\n" + summary(manifest))
            print(f"\nwrote {recipe.run.output_dir}/{{curriculum,pairs,rejected}}/ and manifest.json")
        elif args.cmd == "inspect":
            print(inspect(args.run_dir))
        elif args.cmd == "train":
            from factory.training import train

            recipe = train.load_recipe(args.kind, args.recipe, args.overrides)
            report = train.train(args.kind, recipe, dry_run=args.dry_run)
            if args.dry_run:
                print(json.dumps({k: report[k] for k in ("lengths", "order", "data")}, indent=2))
        elif args.cmd == "eval":
            from factory.training import evaluate

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
