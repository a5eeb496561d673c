"""`factory loop RECIPE`: rounds in which the student becomes the teacher.

DeepSeek-R1 does not stop after one pass: the model trained on one round's data produces the
next round's traces. Round r here is:

    rollout with the round's teacher -> grade [-> score] -> curate   (an ordinary factory run)
    -> train the student: the steps of `rounds.train` in order (sft, dpo, grpo)
    -> evaluate every trained student on the held-out problems
    -> the last trained student is round r+1's teacher

Round 1's teacher is `pipeline.engine.model`; its student starts from `rounds.student`. Round
r+1's student starts from round r's last student (`rounds.student_from: previous`, expert
iteration) or from `rounds.student` again (`base`, as R1 retrained its base on the final data).
Round r+1 rolls out on all problems or only on those round r's teacher did not always solve
(`rounds.next_problems: unsolved`).

Layout: OUT/round-<r>/{run, problems.parquet, student-<step>, eval/<step>, round.json}, and
OUT/rounds.json, rounds.txt, rounds.html (the round table and its plot). Every step resumes like
its own command (the run from its shards, training from checkpoints); a round whose round.json
exists is finished and is not redone, so a loop killed between rounds goes on from the next one.

One vLLM engine serves the whole loop where the models share an architecture (the demo's do):
the next teacher's or student's weights are swapped in, as the demo's evals do.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from factory import config as config_mod, console, store
from factory.engines import Engine, make_engine
from factory.run import pipeline
from factory.run.recipe import Recipe
from factory.run.report import svg_bars, svg_lines
from factory.training import curriculum, evaluate, grpo as grpo_mod, train as train_mod
from factory.training.curriculum import OrderConfig

STEPS = ("sft", "dpo", "grpo")


@dataclass
class RoundsConfig:
    rounds: int = 2
    """How many rounds."""
    output_dir: str = "runs/rounds"
    """Where the rounds go (round-1/, round-2/, ..., rounds.json)."""
    student: str = ""
    """The student's weights before round 1."""
    train: list[str] = field(default_factory=lambda: ["sft"])
    """Training steps of each round, in order: sft, dpo, grpo; each starts from the one before."""
    later_train: list[str] | None = None
    """Training steps of the rounds after the first; None: as `train`."""
    eval_start: bool = True
    """Evaluate the starting student too (round 1's `base` row)."""
    shuffled_control: bool = False
    """Round 1 also trains the same SFT in shuffled order (`sft-shuffled`, evaluated, not handed
    on): the curriculum order's effect, measured. For an SFT order that is shuffled already, name
    the order to compare with in `control_order` instead."""
    control_order: OrderConfig | None = None
    """Round 1 also trains the same SFT in this order (`sft-<strategy>`, evaluated, not handed on),
    e.g. a curriculum beside a shuffled SFT. At most one of this and shuffled_control."""
    seeds: int = 1
    """Train every step (and the control) this many times, with train.seed + 0, 1, ...,
    each evaluated; the table gives mean ± spread (sample standard deviation) over them, and
    seed 0's student is the one handed on."""
    student_from: str = "previous"
    """Round r+1's student starts from: previous (round r's last student) | base (rounds.student)."""
    next_problems: str = "all"
    """Round r+1 rolls out on: all (the recipe's problems) | unsolved (those round r's teacher did
    not solve in every trace)."""


@dataclass
class RoundsRecipe:
    pipeline: Recipe = field(default_factory=Recipe)
    """The run of each round (engine.model: round 1's teacher; run.output_dir is set per round)."""
    sft: train_mod.SFTRecipe = field(default_factory=train_mod.SFTRecipe)
    dpo: train_mod.DPORecipe = field(default_factory=train_mod.DPORecipe)
    grpo: grpo_mod.GRPORecipe = field(default_factory=grpo_mod.GRPORecipe)
    eval: evaluate.EvalRecipe = field(default_factory=evaluate.EvalRecipe)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> RoundsRecipe:
    return config_mod.load(RoundsRecipe, path, overrides)


def check(cfg: RoundsConfig) -> None:
    if cfg.rounds < 1:
        raise ValueError(f"rounds.rounds={cfg.rounds}; at least 1")
    if not cfg.student:
        raise ValueError("rounds.student is empty: name the student's starting weights")
    for name in ("train", "later_train"):
        steps = getattr(cfg, name)
        if (steps is not None or name == "train") and (not steps or any(s not in STEPS for s in steps)):
            raise ValueError(f"rounds.{name}={steps}; a list of {', '.join(STEPS)}")
    if cfg.shuffled_control and cfg.control_order is not None:
        raise ValueError("rounds.shuffled_control and rounds.control_order are both set; name one control")
    if (cfg.shuffled_control or cfg.control_order is not None) and "sft" not in cfg.train:
        name = "shuffled_control" if cfg.shuffled_control else "control_order"
        raise ValueError(f"rounds.{name} needs an sft step in rounds.train")
    if cfg.control_order is not None:
        curriculum.check(cfg.control_order)
    if cfg.seeds < 1:
        raise ValueError(f"rounds.seeds={cfg.seeds}; at least 1")
    if cfg.student_from not in ("previous", "base"):
        raise ValueError(f"rounds.student_from={cfg.student_from!r}; use previous or base")
    if cfg.next_problems not in ("all", "unsolved"):
        raise ValueError(f"rounds.next_problems={cfg.next_problems!r}; use all or unsolved")


class Engines:
    """One in-process engine for the whole loop, its weights swapped between models of the same
    architecture; a new engine when the architecture differs. A passed-in engine is handed back
    with the weights it came with."""

    def __init__(self, engine: Engine | None, log: Callable[[str], None]):
        self.engine, self.log = engine, log
        self.owned = engine is None
        self.original = getattr(engine, "model_name", None)

    def get(self, config, model: str, run_dir: Path) -> Engine:
        e = self.engine
        if e is not None and getattr(e, "model_name", None) == model:
            return e
        if e is not None and hasattr(e, "load_weights"):
            try:  # the engine checks architecture and tokenizer before it touches anything
                e.load_weights(model)
                return e
            except ValueError:
                pass
        if e is not None and self.owned:
            e.close()
        elif e is not None:
            raise ValueError(f"{model} does not fit the engine passed in ({e.model_name}); pass none")
        self.log(f"starting vLLM with {model} ...")
        self.engine = make_engine(config_mod.from_dict(type(config), {**config_mod.to_dict(config), "model": model}),
                                  run_dir)
        self.owned = True
        return self.engine

    def close(self) -> None:
        if self.engine is None:
            return
        if self.owned:
            self.engine.close()
        elif self.original and self.engine.model_name != self.original:
            self.engine.load_weights(self.original)


def unsolved_problems(run_dir: Path, out: Path) -> int:
    """Write the run's problems its teacher did not solve in every trace; returns their count."""
    diff = pq.read_table(run_dir / "difficulty.parquet", columns=["problem_id", "pass_rate"]).to_pylist()
    todo = {r["problem_id"] for r in diff if r["pass_rate"] < 1.0}
    ingest = store.StageDir(run_dir, "ingest")
    parts = [t.filter(pa.array([p in todo for p in t["problem_id"].to_pylist()])) for _, t in ingest.iter_shards()]
    table = pa.concat_tables(parts)
    store.write_parquet(table.select([c for c in table.column_names if c in (
        "problem_id", "question", "answer", "domain", "choices", "source", "split", "level")]), out)
    return table.num_rows


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None


def student_entry(evals: list[dict]) -> dict:
    """A student's pass@1 overall and per group: one eval, or the mean and spread over its seeds."""
    overall = mean_spread([e["overall"].get("pass@1") for e in evals])
    groups = {g for e in evals for g in e.get("groups", {})}
    by = {g: mean_spread([e["groups"][g].get("pass@1") for e in evals if g in e.get("groups", {})]) for g in groups}
    out = {"pass@1": overall[0], "by_group": {g: v[0] for g, v in by.items()}}
    if len(evals) > 1:
        out.update(seeds=len(evals), spread=overall[1], by_group_spread={g: v[1] for g, v in by.items()})
    return out


def round_row(r: int, teacher: str, manifest: dict, evals: dict[str, list[dict]], problems: int) -> dict:
    """The round's table row; `evals` holds each student's evaluations, one per seed."""
    verdicts = manifest["stages"]["grade"].get("verdicts", {})
    traces = sum(verdicts.values())
    return {"round": r, "teacher": teacher, "problems": problems,
            "teacher_pass_rate": round(verdicts.get("correct", 0) / traces, 4) if traces else None,
            "curriculum_rows": sum(s["rows"] for s in manifest["curriculum"]),
            "pairs": manifest["stages"]["curate"].get("pairs"),
            "students": {name: student_entry(e) for name, e in evals.items()}}


def _pct(value: float | None, spread: float | None, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{f'{100 * value:.1f}±{100 * spread:.1f}%' if spread is not None else f'{100 * value:.1f}%':>{width}}"


def table(rows: list[dict]) -> str:
    groups = sorted({g for row in rows for s in row["students"].values() for g in s["by_group"]},
                    key=evaluate._natural)
    seeded = any("seeds" in s for row in rows for s in row["students"].values())
    w = 13 if seeded else 10  # room for "45.1±1.2%"
    head = f"{'round':<6}{'student':<14}{'teacher pass':>13}{'curriculum':>11}{'pass@1':>{w - 2}}" \
        + "".join(f"{g:>{w}}" for g in groups)
    lines = [head]
    for row in rows:
        for name, s in row["students"].items():
            tp = row["teacher_pass_rate"]
            spread = s.get("by_group_spread", {})
            lines.append(f"{row['round']:<6}{name:<14}{'' if tp is None else f'{100 * tp:.1f}%':>13}"
                         f"{row['curriculum_rows']:>11}" + _pct(s["pass@1"], s.get("spread"), w - 2)
                         + "".join(_pct(s["by_group"].get(g), spread.get(g), w) for g in groups))
    if seeded:
        lines.append("(mean ± sample standard deviation over the seeds; seeds per student: "
                     + ", ".join(f"{n} {s['seeds']}" for n, s in rows[0]["students"].items() if "seeds" in s) + ")")
    return "\n".join(lines)


def html(rows: list[dict]) -> str:
    labels = [f"round {row['round']}" for row in rows]
    names = list(dict.fromkeys(n for row in rows for n in row["students"]))
    series = {"teacher (traces)": [row["teacher_pass_rate"] or 0.0 for row in rows]}
    series |= {f"student {n}": [row["students"].get(n, {}).get("pass@1") or 0.0 for row in rows] for n in names}
    curves = ""
    for row in rows:
        for name, history in row.get("reward_history", {}).items():
            steps = [h["step"] for h in history]
            curves += svg_lines(f"round {row['round']}, {name}: reward per logged step", steps,
                                {k: [h.get(k) or 0.0 for h in history] for k in ("accuracy", "format", "zero_advantage_groups")})
    return ("<html><body><h2>Rounds: the student becomes the teacher</h2>"
            + svg_bars("teacher pass rate on the round's problems; student pass@1 on held-out problems", labels, series)
            + curves + "<pre>" + table(rows) + "</pre></body></html>")


def run_loop(recipe: RoundsRecipe, engine: Engine | None = None, log: Callable[[str], None] = console.say) -> list[dict]:
    """Run (or resume) every round; returns the round table's rows."""
    cfg = recipe.rounds
    check(cfg)
    control = control_order(recipe)  # before any work: a control that repeats the SFT is an error
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    engines = Engines(engine, log)
    rows: list[dict] = []
    teacher, student = recipe.pipeline.engine.model, cfg.student
    try:
        for r in range(1, cfg.rounds + 1):
            rdir = out / f"round-{r}"
            done = rdir / "round.json"
            if done.exists():
                row = json.loads(done.read_text())
                rows.append(row)
                teacher, student = row["next_teacher"], row["next_student"]
                log(f"round {r}: finished before, reused ({done})")
                continue
            t0 = time.perf_counter()
            log(f"round {r}: teacher {teacher}, student from {student}")
            p = config_mod.from_dict(Recipe, config_mod.to_dict(recipe.pipeline))
            p.run.output_dir, p.engine.model = str(rdir / "run"), teacher
            if r > 1 and cfg.next_problems == "unsolved":
                prev = out / f"round-{r - 1}" / "run"
                n = unsolved_problems(prev, rdir / "problems.parquet") if not (rdir / "problems.parquet").exists() \
                    else pq.ParquetFile(rdir / "problems.parquet").metadata.num_rows
                if n == 0:
                    log(f"round {r}: the teacher of round {r - 1} solved every problem; the loop ends")
                    break
                p.ingest = config_mod.from_dict(type(p.ingest), {**config_mod.to_dict(p.ingest),
                                                                 "paths": [str(rdir / "problems.parquet")]})
            # an in-process engine is held for the whole loop (the evals need it too); a server is the run's own
            manifest = pipeline.run(p, engine=engines.get(p.engine, teacher, rdir / "run")
                                    if p.engine.backend == "vllm" else None, log=log)
            trained: dict[str, str] = {"base": student} if r == 1 and cfg.eval_start else {}
            seeded: dict[str, list[str]] = {}  # a student's other seeds, evaluated beside it
            current = student
            for step in (cfg.train if r == 1 or cfg.later_train is None else cfg.later_train):
                start, current = current, train_step(recipe, step, current, rdir, log)
                trained[step] = current
                seeded[step] = [train_step(recipe, step, start, rdir, log, seed=k) for k in range(1, cfg.seeds)]
            if r == 1 and control is not None:
                name = f"sft-{control.strategy}"
                trained[name] = train_step(recipe, "sft", student, rdir, log, order=control)
                seeded[name] = [train_step(recipe, "sft", student, rdir, log, order=control, seed=k)
                                for k in range(1, cfg.seeds)]
            evals: dict[str, list[dict]] = {}
            for name, model in list(trained.items()) + \
                    [(n, m) for n, ms in seeded.items() for m in ms]:
                e = config_mod.from_dict(evaluate.EvalRecipe, config_mod.to_dict(recipe.eval))
                e.engine.model, e.run.output_dir = model, str(rdir / "eval" / name)
                done_eval = Path(e.run.output_dir) / "eval.json"
                if model != trained[name]:  # another seed of the student
                    e.run.output_dir = str(rdir / "eval" / f"{name}-{Path(model).name.rsplit('-', 1)[-1]}")
                    done_eval = Path(e.run.output_dir) / "eval.json"
                if done_eval.exists() and json.loads(done_eval.read_text()).get("model") == model:
                    evals.setdefault(name, []).append(json.loads(done_eval.read_text()))
                    continue
                evals.setdefault(name, []).append(
                    evaluate.evaluate(e, engine=engines.get(e.engine, model, Path(e.run.output_dir)), log=log))
            row = round_row(r, teacher, manifest, evals, manifest["stages"]["ingest"]["out"])
            row["reward_history"] = {name: json.loads((Path(model) / "factory_train.json").read_text())["reward_history"]
                                     for name, model in trained.items() if name.startswith("grpo")}
            teacher = current
            student = current if cfg.student_from == "previous" else cfg.student
            row.update(next_teacher=teacher, next_student=student, seconds=round(time.perf_counter() - t0, 1))
            store.write_json(row, done)
            rows.append(row)
            log(f"round {r}: done in {row['seconds']} s")
    finally:
        engines.close()
    store.write_json(rows, out / "rounds.json")
    (out / "rounds.txt").write_text(table(rows) + "\n")
    (out / "rounds.html").write_text(html(rows))
    log("\n" + table(rows) + f"\n\nround table: {out / 'rounds.txt'}, plot: {out / 'rounds.html'}")
    return rows


def control_order(recipe: RoundsRecipe) -> OrderConfig | None:
    """The order round 1's control SFT trains in, or None."""
    cfg = recipe.rounds
    if cfg.control_order is not None:
        if config_mod.to_dict(cfg.control_order) == config_mod.to_dict(recipe.sft.data.order):
            raise ValueError("rounds.control_order is the SFT's own order (sft.data.order), so the control "
                             "would train the same student twice; name another order")
        return cfg.control_order
    if not cfg.shuffled_control:
        return None
    if recipe.sft.data.order.strategy == "shuffled":
        raise ValueError("rounds.shuffled_control: the SFT order is shuffled already, so the control would "
                         "train the same student twice; name the order to compare with in rounds.control_order")
    return dataclasses.replace(recipe.sft.data.order, strategy="shuffled")


def train_step(recipe: RoundsRecipe, step: str, model: str, rdir: Path, log,
               order: OrderConfig | None = None, seed: int = 0) -> str:
    """Train `model` with the round's data (with train.seed + `seed`; SFT in `order` where given,
    a control's student-sft-<strategy>); a finished step (its factory_train.json) is reused."""
    tag = f"-{order.strategy}" if order is not None else ""
    out = rdir / f"student-{step}{tag}{f'-seed{seed}' if seed else ''}"
    run_dir = str(rdir / "run")
    if (out / "factory_train.json").exists():
        return str(out)
    if step == "grpo":
        g = config_mod.from_dict(grpo_mod.GRPORecipe, config_mod.to_dict(recipe.grpo))
        g.model.path, g.data.run_dir, g.train.output_dir = model, run_dir, str(out)
        g.train.seed += seed
        grpo_mod.train(g, log=log)
        return str(out)
    kind = step
    t = config_mod.from_dict(train_mod.SFTRecipe if kind == "sft" else train_mod.DPORecipe,
                             config_mod.to_dict(getattr(recipe, kind)))
    t.model.path, t.data.run_dir, t.train.output_dir = model, run_dir, str(out)
    if order is not None:
        t.data.order = dataclasses.replace(order)  # a copy: its seed is offset below
    t.train.seed += seed
    t.data.order.seed += seed  # the order's draws are part of what a seed varies
    if kind == "dpo":
        t.dpo.ref_model = model
    train_mod.train(kind, t, log=log)
    return str(out)
