"""The `factory` command.

    factory run RECIPE [section.key=value ...]   run a recipe's stages (resumes in run.output_dir)
        [--dry-run]                                 check the recipe (stage configs, the PRM's context); no models
    factory status RUN_DIR                        a run's progress (RUN/progress.json), running or finished
    factory inspect RUN_DIR                       counts, verdicts and the difficulty histogram of a run
    factory publish RUN_DIR REPO_ID [--private]   upload the products and the dataset card to a hub dataset repo
    factory train sft|dpo RECIPE [key=value ...]  curriculum SFT / DPO on a run's shards (TRL)
        [--dry-run]                                 check data, lengths, order and TRL arguments; no weights
    factory train grpo RECIPE [key=value ...]     GRPO on the run's problems with the grader as reward (TRL)
    factory eval RECIPE [key=value ...]           pass@k / maj@k of a model on held-out problems
    factory eval --compare A B                    two eval results side by side
    factory prm score|label|train|eval|calibrate RECIPE [key=value ...]   process reward models (prm/cli.py)
    factory demo RECIPE [key=value ...]           the whole loop on the shipped tiny models, with a report
    factory loop RECIPE [key=value ...]           rounds: run -> train -> eval, the student becomes the teacher

By default a command shows its own lines and one live line per stage; what the libraries
print (vLLM, transformers, datasets, math-verify, Ray) goes to <output dir>/logs/<command>.log.
-v / --verbose shows all of it on the terminal instead.

Exit status: 0 done; 2 a bad recipe or input (the message names the file, row and field);
3 `factory run` finished, but requests failed for good after their retries (it says how many,
why, and the command that sends them again; `run.allow_failures=true` exits 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from factory import console
from factory.config import ConfigError
from factory.run.report import failures_line, inspect, summary
from factory.stages.ingest import IngestError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="factory", description="reasoning-trace distillation data factory")
    sub = parser.add_subparsers(dest="cmd", required=True)
    loud = argparse.ArgumentParser(add_help=False)
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="show the libraries' logs on the terminal (default: OUTPUT_DIR/logs/)")
    p_run = sub.add_parser("run", help="run a recipe's stages", parents=[loud])
    p_run.add_argument("recipe")
    p_run.add_argument("overrides", nargs="*", help="section.key=value")
    p_run.add_argument("--dry-run", action="store_true",
                       help="check the stage configs and the PRM's context against score.prm.max_length; load no model")
    p_status = sub.add_parser("status", help="a run's progress: stage, shards, traces, tok/s, ETA")
    p_status.add_argument("run_dir", type=Path)
    p_publish = sub.add_parser("publish", help="upload a run's products and dataset card (RUN/README.md) to the hub")
    p_publish.add_argument("run_dir", type=Path)
    p_publish.add_argument("repo_id")
    p_publish.add_argument("--private", action="store_true")
    p_inspect = sub.add_parser("inspect", help="print a run's counts and difficulty histogram")
    p_inspect.add_argument("run_dir", type=Path)
    p_train = sub.add_parser("train", help="curriculum SFT or DPO on a run's shards; GRPO on its problems", parents=[loud])
    p_train.add_argument("kind", choices=["sft", "dpo", "grpo"])
    p_train.add_argument("recipe")
    p_train.add_argument("overrides", nargs="*", help="section.key=value")
    p_train.add_argument("--dry-run", action="store_true",
                         help="read data, measure lengths, plan the order, build TRL's config; load no weights")
    p_eval = sub.add_parser("eval", help="pass@k / maj@k of a model on held-out problems", parents=[loud])
    p_eval.add_argument("recipe", nargs="?")
    p_eval.add_argument("overrides", nargs="*", help="section.key=value")
    p_eval.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two eval.json files (or their dirs)")
    p_prm = sub.add_parser("prm", help="PRM: score traces, Monte-Carlo labels, train, ProcessBench eval, calibrate", parents=[loud])
    p_prm.add_argument("prm_cmd", choices=["score", "label", "train", "eval", "calibrate"])
    p_prm.add_argument("recipe")
    p_prm.add_argument("overrides", nargs="*", help="section.key=value")
    p_demo = sub.add_parser("demo", help="the whole loop on the shipped tiny models, with a report", parents=[loud])
    p_demo.add_argument("recipe")
    p_demo.add_argument("overrides", nargs="*", help="section.key=value")
    p_loop = sub.add_parser("loop", help="rounds in which the trained student becomes the next teacher", parents=[loud])
    p_loop.add_argument("recipe")
    p_loop.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "run":
            from factory.run.pipeline import run
            from factory.run.recipe import EXIT_FAILED_REQUESTS, dry_run, load_recipe

            recipe = load_recipe(args.recipe, args.overrides)
            if args.dry_run:
                report = dry_run(recipe)
                print(json.dumps(report, indent=2))
                prm = report.get("prm_context")
                if prm is not None and not prm["checked"]:
                    print(f"factory: score.prm.max_length not checked: {prm['source']}", file=sys.stderr)
                return 0
            with console.quiet(Path(recipe.run.output_dir) / "logs", "run", args.verbose) as logs:
                if logs:
                    console.say(f"library logs: {logs}")
                manifest = run(recipe)
                console.say("\n" + summary(manifest))
                console.say(f"\nwrote {recipe.run.output_dir}/{{curriculum,pairs,rejected}}/, README.md and manifest.json")
            if manifest["failed_requests"]["total"] and not recipe.run.allow_failures:
                retry = " ".join(["factory run", args.recipe, *args.overrides])
                print(f"factory: {failures_line(manifest, f'`{retry}`')}\n(exit status {EXIT_FAILED_REQUESTS}; "
                      "run.allow_failures=true exits 0)", file=sys.stderr)
                return EXIT_FAILED_REQUESTS
        elif args.cmd == "status":
            from factory.run.progress import status

            print(status(args.run_dir))
        elif args.cmd == "publish":
            from factory.run.card import publish

            print(f"published {args.run_dir} to {publish(args.run_dir, args.repo_id, args.private)}")
        elif args.cmd == "inspect":
            print(inspect(args.run_dir))
        elif args.cmd == "train" and args.kind == "grpo":
            from factory.training import grpo

            recipe = grpo.load_recipe(args.recipe, args.overrides)
            with console.quiet(Path(recipe.train.output_dir) / "logs", "train-grpo", args.verbose or args.dry_run):
                report = grpo.train(recipe, dry_run=args.dry_run)
            if args.dry_run:
                print(json.dumps({k: report[k] for k in ("prompts", "data")}, indent=2))
        elif args.cmd == "train":
            from factory.training import train

            recipe = train.load_recipe(args.kind, args.recipe, args.overrides)
            with console.quiet(Path(recipe.train.output_dir) / "logs", f"train-{args.kind}", args.verbose or args.dry_run):
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
                recipe = evaluate.load_recipe(args.recipe, args.overrides)
                with console.quiet(Path(recipe.run.output_dir) / "logs", "eval", args.verbose):
                    result = evaluate.evaluate(recipe)
                    console.say("\n" + evaluate.table(result))
        elif args.cmd == "demo":
            from factory import demo

            recipe = demo.load_recipe(args.recipe, args.overrides)
            with console.quiet(Path(recipe.pipeline.run.output_dir) / "logs", "demo", args.verbose) as logs:
                if logs:
                    console.say(f"library logs: {logs}")
                demo.run_demo(recipe)
        elif args.cmd == "loop":
            from factory.training import rounds

            recipe = rounds.load_recipe(args.recipe, args.overrides)
            with console.quiet(Path(recipe.rounds.output_dir) / "logs", "loop", args.verbose) as logs:
                if logs:
                    console.say(f"library logs: {logs}")
                rounds.run_loop(recipe)
        elif args.cmd == "prm":
            from prm import cli as prm_cli

            recipe = prm_cli.load_recipe(args.recipe, args.overrides)
            with console.quiet(Path(recipe.run.output_dir) / "logs", f"prm-{args.prm_cmd}", args.verbose):
                prm_cli.run_command(args.prm_cmd, recipe, log=console.say)
    except (ConfigError, IngestError, FileNotFoundError, ValueError, ConnectionError) as e:
        print(f"factory: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
