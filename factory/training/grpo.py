"""`factory train grpo`: RL of a student on the factory's own rule rewards, on TRL's GRPOTrainer.

In:  a factory run directory (its graded problems and RUN/difficulty.parquet) and a student.
Out: TRAIN.output_dir/ with the trained model and tokenizer, `factory_train.json` (resolved
     recipe, TRL arguments, package versions, the files consumed with their sha256, the prompts
     left out and why, the reward history per logged step) and `prompts.jsonl` (the problem ids
     in the order the trainer sees them).

    factory train grpo recipes/demo_grpo.yaml model.path=runs/demo/student-sft

The loop is TRL's (group sampling, advantages, clipped policy loss, KL to the reference, vLLM
generation on a GPU with `grpo.use_vllm`). What the factory adds is what it already knows:

- rewards are the grade stage's code, not a copy: `accuracy` is 1 when `grade.grade_many` calls
  the completion `correct` against the problem's reference (in the same timeout worker pool, so
  math-verify's signal-based timeouts stay in worker processes), `format` is `answers.format_ok`
  (R1's `<think>...</think>` then an answer). Their weights come from `reward:`.
- prompts are the run's problems with their measured pass rates. A problem every teacher trace
  solved, or none did, is left out by default: a group whose rewards are all equal has zero
  advantage and teaches nothing (DAPO's dynamic sampling, done up front with data the run already
  has). A problem with any `unverifiable` trace is always left out: its reward would be noise.
- the order is the curriculum's (`data.order`, factory.training.curriculum), counted in prompts
  per optimizer step; TRL's sampler is told not to shuffle.
- the prompt is the one the teacher saw (the run's rollout settings: chat template or R1-Zero),
  unless `data.prompt_format` / `data.question_template` say otherwise.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from factory import answers, config as config_mod, console, store, verify
from factory.stages.grade import GradeConfig, GradeJob, grade_many, make_pool
from factory.stages.rollout import R1_ZERO_TEMPLATE, RolloutConfig, prompt_messages
from factory.training.curriculum import OrderConfig, training_order
from factory.training.params import check_train_only, restrict_training
from factory.training.train import ConsoleProgress, ModelConfig, TrainConfig, last_checkpoint, load_model, \
    load_tokenizer, peft_config


@dataclass
class GRPOData:
    run_dir: str = ""
    """A finished `factory run` directory: its graded problems and difficulty.parquet."""
    splits: list[str] = field(default_factory=lambda: ["train"])
    """Problem splits to train on."""
    keep_all_solved: bool = False
    """Keep problems every teacher trace solved (zero advantage unless the student differs)."""
    keep_none_solved: bool = False
    """Keep problems no teacher trace solved."""
    max_problems: int | None = None
    """Use only the first N problems of the order's first pass (None: all)."""
    order: OrderConfig = field(default_factory=lambda: OrderConfig(strategy="sorted", epochs=1))
    """Order of the prompts (factory.training.curriculum), in prompts per optimizer step."""
    prompt_format: str | None = None
    """chat | r1_zero; None: as the run's rollout."""
    question_template: str | None = None
    """None: as the run's rollout."""
    system_prompt: str | None = None
    """None: as the run's rollout."""


@dataclass
class RewardWeights:
    accuracy: float = 1.0
    """Weight of the accuracy reward (1 for a `correct` verdict, else 0)."""
    format: float = 0.5
    """Weight of the format reward (1 when `<think>...</think>` then an answer)."""


@dataclass
class GRPOSettings:
    num_generations: int = 8
    """Completions per prompt (the group)."""
    max_completion_length: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.001
    """KL coefficient to the reference (DeepSeek-R1's 0.001; 0 loads no reference model)."""
    epsilon: float = 0.2
    """Clip range of the policy ratio."""
    loss_type: str = "dapo"
    """TRL's loss aggregation: dapo | grpo | dr_grpo | bnpo | ..."""
    scale_rewards: str = "group"
    """group | batch | none (Dr. GRPO)."""
    num_iterations: int = 1
    """Policy updates per generated batch (mu)."""
    generation_batch_size: int | None = None
    """Completions generated at once; None: TRL's default (the effective batch)."""
    use_vllm: bool = False
    """Generate with vLLM (GPU): TRL's use_vllm."""
    vllm_mode: str = "colocate"
    """colocate (vLLM in the trainer's process) | server (`trl vllm-serve`)."""
    vllm_gpu_memory_utilization: float = 0.3
    """colocate: the GPU share vLLM may take beside the trainer."""
    log_completions: bool = False


@dataclass
class GRPORecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: GRPOData = field(default_factory=GRPOData)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-6, warmup_steps=0.0))
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    reward: RewardWeights = field(default_factory=RewardWeights)
    grade: GradeConfig = field(default_factory=GradeConfig)
    """How completions are graded (the grade stage's settings)."""


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> GRPORecipe:
    return config_mod.load(GRPORecipe, path, overrides)


# --- rewards ----------------------------------------------------------------------------


def completion_text(completion) -> str:
    """TRL hands a conversational completion as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion)


class Rewards:
    """The two rule rewards as TRL reward functions (named `accuracy` and `format` in its logs)."""

    def __init__(self, grade: GradeConfig, pool):
        self.grade, self.pool = grade, pool

    def verdicts(self, completions, answer, domain, choices) -> list[str]:
        jobs = [GradeJob(completion_text(c), a, d, ch, self.grade)
                for c, a, d, ch in zip(completions, answer, domain, choices)]
        return [v for v, _, _ in grade_many(jobs, self.pool)]

    def accuracy(self, completions, answer, domain, choices, **_) -> list[float]:
        return [1.0 if v == verify.CORRECT else 0.0 for v in self.verdicts(completions, answer, domain, choices)]

    def format(self, completions, **_) -> list[float]:
        return [1.0 if answers.format_ok(completion_text(c)) else 0.0 for c in completions]


# --- prompts ----------------------------------------------------------------------------


PROBLEM_COLUMNS = ["problem_id", "question", "answer", "domain", "choices", "split", "level"]


DIFFICULTY_COLUMNS = ["problem_id", "num_traces", "num_correct", "pass_rate", "difficulty"]


def read_problems(run_dir: str | Path, spill: str | Path | None = None) -> tuple[pa.Table, dict]:
    """One row per graded problem of a run: its fields, pass rate, difficulty and whether any of
    its traces was unverifiable; and the files read, with their sha256.

    Read a grade shard at a time (a problem's traces all live in one shard), joined with the
    difficulty table's numbers (~50 bytes per problem, the only thing held for the whole run).
    With `spill` (a file), the rows go there as they are made (Arrow IPC) and the table returned
    is memory-mapped from it, so the texts stay in the file rather than in this process."""
    run = Path(run_dir)
    diff_path = run / "difficulty.parquet"
    if not diff_path.exists():
        raise FileNotFoundError(f"{diff_path}: not found; data.run_dir must be a finished `factory run` directory")
    grade = store.StageDir(run, "grade")
    files = [grade.shard(i) for i in range(grade.num_shards())]
    # the difficulty table is sorted by problem_id: its ids as fixed-width bytes and its numbers as
    # arrays are the lookup (~50 bytes per problem); a shard's problems find theirs by binary search
    diff = pq.read_table(diff_path, columns=DIFFICULTY_COLUMNS)
    diff_ids = _id_bytes(diff["problem_id"].to_pylist())
    numbers = {c: diff[c].to_numpy() for c in DIFFICULTY_COLUMNS[1:]}
    del diff
    parts, writer = [], None
    for f in files:
        t = pq.read_table(f, columns=PROBLEM_COLUMNS + ["verdict"])
        seen: dict[str, dict] = {}
        for r in t.to_pylist():
            p = seen.setdefault(r["problem_id"], {c: r[c] for c in PROBLEM_COLUMNS} | {"unverifiable": False})
            p["unverifiable"] |= r["verdict"] == verify.UNVERIFIABLE
        columns = pa.schema(list(t.schema.remove(t.schema.get_field_index("verdict"))) + [pa.field("unverifiable", pa.bool_())])
        part = pa.Table.from_pylist(sorted(seen.values(), key=lambda r: r["problem_id"]), schema=columns)
        ids = _id_bytes(part["problem_id"].to_pylist())
        at = np.minimum(np.searchsorted(diff_ids, ids), max(0, len(diff_ids) - 1))
        found = (diff_ids[at] == ids) if len(diff_ids) else np.zeros(len(ids), dtype=bool)
        part = part.filter(pa.array(found))  # a problem missing from the difficulty table is not trained on
        for c, values in numbers.items():
            part = part.append_column(c, pa.array(values[at[found]]))
        if spill is None:
            parts.append(part)
            continue
        if writer is None:
            Path(spill).parent.mkdir(parents=True, exist_ok=True)
            writer = pa.ipc.new_file(str(spill), part.schema)
        writer.write_table(part)
    consumed = {"run_dir": str(run.resolve()), "files": [
        {"file": str(p.relative_to(run)), "sha256": store.sha256_file(p)} for p in [diff_path, *files]]}
    if spill is None:
        return pa.concat_tables(parts) if parts else pa.table({}), consumed
    if writer is None:
        return pa.table({}), consumed
    writer.close()
    return pa.ipc.open_file(pa.memory_map(str(spill))).read_all(), consumed


def _id_bytes(ids: list[str]) -> np.ndarray:
    # UTF-8 bytes sort as their strings do (code point order), so a sorted id column stays sorted
    return np.array([i.encode() for i in ids], dtype=np.bytes_) if ids else np.array([], dtype="S1")


def selection(problems: pa.Table, cfg: GRPOData) -> tuple[np.ndarray, dict[str, int]]:
    """A mask of the problems RL can learn from, and how many were left out for each reason (a
    problem is counted under its first reason); computed on the small columns only."""
    import pyarrow.compute as pc

    if problems.num_rows == 0:
        return np.zeros(0, dtype=bool), {"split": 0, "unverifiable": 0, "all_solved": 0, "none_solved": 0}
    split = pc.fill_null(pc.is_in(problems["split"], value_set=pa.array(cfg.splits, pa.string())), False).to_numpy(False)
    unverifiable = problems["unverifiable"].to_numpy(False)
    rate = problems["pass_rate"].to_numpy(False)
    solved = (rate >= 1.0) & (not cfg.keep_all_solved)
    unsolved = (rate <= 0.0) & (not cfg.keep_none_solved)
    left_out = {"split": int((~split).sum()), "unverifiable": int((split & unverifiable).sum()),
                "all_solved": int((split & ~unverifiable & solved).sum()),
                "none_solved": int((split & ~unverifiable & ~solved & unsolved).sum())}
    return split & ~unverifiable & ~solved & ~unsolved, left_out


def select_problems(problems: pa.Table, cfg: GRPOData) -> tuple[pa.Table, dict[str, int]]:
    """The problems RL can learn from (a table), and how many were left out for each reason."""
    keep, left_out = selection(problems, cfg)
    return problems.filter(pa.array(keep)) if problems.num_rows else problems, left_out


def prompt_of(question: str, rollout: RolloutConfig):
    """The teacher's prompt: conversational messages (chat) or plain text (R1-Zero)."""
    if rollout.prompt_format == "r1_zero":
        return R1_ZERO_TEMPLATE.format(question=question)
    if rollout.prompt_format != "chat":
        raise ValueError(f"prompt_format={rollout.prompt_format!r}; use chat or r1_zero")
    return prompt_messages(question, rollout)


def run_rollout_config(run_dir: str | Path, cfg: GRPOData) -> RolloutConfig:
    """The run's rollout settings, with the recipe's prompt overrides."""
    manifest = store.read_json(Path(run_dir) / "manifest.json")
    rollout = config_mod.from_dict(RolloutConfig, manifest["config"]["rollout"])
    for name in ("prompt_format", "question_template", "system_prompt"):
        if getattr(cfg, name) is not None:
            setattr(rollout, name, getattr(cfg, name))
    return rollout


def prompts_per_step(recipe: GRPORecipe, world: int = 1) -> int:
    t, g = recipe.train, recipe.grpo
    completions = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    if completions % g.num_generations:
        raise ValueError(f"train.per_device_train_batch_size x gradient_accumulation_steps = {completions} completions "
                         f"per step must be a multiple of grpo.num_generations={g.num_generations}")
    return completions // g.num_generations


@dataclass
class Plan:
    problems: pa.Table  # every graded problem (memory-mapped from the train output dir)
    order: np.ndarray  # the rows of `problems` the trainer sees, in training order (one per prompt)
    rollout: RolloutConfig
    args: object
    report: dict

    def rows(self, batch: int = 1024) -> Iterator[dict]:
        """The prompts' problems in training order, a batch of rows taken at a time."""
        for start in range(0, len(self.order), batch):
            yield from self.problems.take(pa.array(self.order[start:start + batch])).to_pylist()


def trl_args(recipe: GRPORecipe):
    import torch
    from trl import GRPOConfig

    t, g = recipe.train, recipe.grpo
    for k in ("shuffle_dataset", "num_train_epochs", "remove_unused_columns", "reward_weights"):
        if k in t.extra:
            raise ValueError(f"train.extra.{k} is set by the factory; use data.order / reward instead")
    return GRPOConfig(
        output_dir=t.output_dir, learning_rate=t.learning_rate, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, save_steps=t.save_steps, save_total_limit=t.save_total_limit, bf16=t.bf16,
        gradient_checkpointing=t.gradient_checkpointing, seed=t.seed, report_to=list(t.report_to),
        use_cpu=not torch.cuda.is_available(), num_train_epochs=1, shuffle_dataset=False,
        remove_unused_columns=False, dataloader_num_workers=0,
        num_generations=g.num_generations, max_completion_length=g.max_completion_length,
        temperature=g.temperature, top_p=g.top_p, beta=g.beta, epsilon=g.epsilon, loss_type=g.loss_type,
        scale_rewards=g.scale_rewards, num_iterations=g.num_iterations, generation_batch_size=g.generation_batch_size,
        use_vllm=g.use_vllm, vllm_mode=g.vllm_mode, vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization,
        log_completions=g.log_completions, reward_weights=[recipe.reward.accuracy, recipe.reward.format],
        **t.extra)


def plan(recipe: GRPORecipe, log: Callable[[str], None] = console.say, spill: Path | None = None) -> Plan:
    """Read the run, choose the prompts and their order, build TRL's arguments (no weights).
    The run's problems are memory-mapped from `spill` (default TRAIN.output_dir/problems.arrow)."""
    d = recipe.data
    check_train_only(recipe.model)
    problems, consumed = read_problems(d.run_dir, spill or Path(recipe.train.output_dir) / "problems.arrow")
    keep, left_out = selection(problems, d)
    chosen = np.flatnonzero(keep)
    if len(chosen) == 0:
        raise ValueError(f"{d.run_dir}: no problem is left to train on ({problems.num_rows} read; left out: "
                         f"{left_out}); set data.keep_all_solved / keep_none_solved or check data.splits")
    # sorted on the small keys only: the texts stay where they are
    keys = problems.select(["difficulty", "problem_id"]).take(pa.array(chosen))
    import pyarrow.compute as pc

    chosen = chosen[pc.sort_indices(keys, [("difficulty", "ascending"), ("problem_id", "ascending")]).to_numpy()]
    if d.max_problems:
        chosen = chosen[: d.max_problems]
    selected_rows = len(chosen)
    per_step = prompts_per_step(recipe)
    order = training_order(problems["difficulty"].take(pa.array(chosen)).to_pylist(), d.order, per_step)
    max_steps = recipe.train.extra.get("max_steps", -1)
    if max_steps and max_steps > 0:
        order = order[: max_steps * per_step]
    rollout = run_rollout_config(d.run_dir, d)
    args = trl_args(recipe)
    report = {"kind": "grpo", "recipe": config_mod.to_dict(recipe), "data": consumed,
              "prompts": {"read": problems.num_rows, "selected": selected_rows, "left_out": left_out,
                          "seen": len(order), "per_step": per_step, "steps": -(-len(order) // per_step),
                          "strategy": d.order.strategy, "prompt_format": rollout.prompt_format}}
    log(f"grpo: {selected_rows} of {problems.num_rows} problems ({', '.join(f'{k}={v}' for k, v in left_out.items() if v)}"
        f" left out), {len(order)} prompts x {recipe.grpo.num_generations} completions in {report['prompts']['steps']} steps")
    return Plan(problems, chosen[np.asarray(order, dtype=np.int64)], rollout, args, report)


def reward_history(log_history: list[dict]) -> list[dict]:
    """Per logged step: mean accuracy and format reward, total reward, the share of groups whose
    rewards were all equal (zero advantage), completion length."""
    keys = {"rewards/accuracy/mean": "accuracy", "rewards/format/mean": "format", "reward": "reward",
            "frac_reward_zero_std": "zero_advantage_groups", "completions/mean_length": "mean_length"}
    return [{"step": h["step"], **{new: h[old] for old, new in keys.items() if old in h}}
            for h in log_history if "reward" in h]


def write_prompts(p: Plan, out: Path) -> Path:
    """The trainer's rows (prompt, answer, domain, choices, problem_id) in training order, written
    a batch at a time to OUT/prompts.arrow (Arrow IPC stream, the format datasets memory-maps),
    and their ids with pass rates to OUT/prompts.jsonl."""
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    prompt = pa.string() if p.rollout.prompt_format == "r1_zero" else pa.list_(message)
    schema_ = pa.schema([("prompt", prompt), ("answer", pa.string()), ("domain", pa.string()),
                         ("choices", pa.list_(pa.string())), ("problem_id", pa.string())])
    path, buf = out / "prompts.arrow", []
    with open(out / "prompts.jsonl", "w") as f, pa.ipc.new_stream(str(path), schema_) as w:
        for i, r in enumerate(p.rows()):
            f.write(json.dumps({"i": i, "problem_id": r["problem_id"], "pass_rate": r["pass_rate"]}) + "\n")
            buf.append({"prompt": prompt_of(r["question"], p.rollout), "answer": r["answer"], "domain": r["domain"],
                        "choices": r["choices"], "problem_id": r["problem_id"]})
            if len(buf) >= 1024:
                w.write_table(pa.Table.from_pylist(buf, schema=schema_))
                buf = []
        w.write_table(pa.Table.from_pylist(buf, schema=schema_))
    return path


def train(recipe: GRPORecipe, dry_run: bool = False, log: Callable[[str], None] = console.say) -> dict:
    """Train (or plan only) and write the reports; returns factory_train.json's content."""
    t0 = time.perf_counter()
    if dry_run:  # nothing lands in the output dir
        import shutil
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="grpo-plan-"))
        try:
            p = plan(recipe, log, spill=scratch / "problems.arrow")
            p.report["trl_args"] = {k: str(v) for k, v in p.args.to_dict().items()}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return p.report
    p = plan(recipe, log)
    import datasets
    from trl import GRPOTrainer

    from factory.run.products import package_versions

    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_file(str(write_prompts(p, out)))  # memory-mapped, as datasets keeps its own
    tokenizer = load_tokenizer(recipe.model)
    tokenizer.padding_side = "left"  # TRL generates from left-padded prompts
    with make_pool(recipe.grade) as pool:
        rewards = Rewards(recipe.grade, pool)
        model = load_model(recipe.model)
        p.report["trainable"] = restrict_training(model, recipe.model)
        trainer = GRPOTrainer(model=model, reward_funcs=[rewards.accuracy, rewards.format],
                              args=p.args, train_dataset=ds, processing_class=tokenizer,
                              peft_config=peft_config(recipe.model.lora))
        if console.log_path() is not None:
            trainer.add_callback(ConsoleProgress(f"grpo {out.name}"))
        resume = last_checkpoint(str(out))
        if resume:
            log(f"grpo: resuming from {resume}")
        result = trainer.train(resume_from_checkpoint=resume)
    if not recipe.model.lora.enabled:
        trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        if recipe.model.lora.enabled:
            trainer.model.merge_and_unload().save_pretrained(out)
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(out)
        history = reward_history(trainer.state.log_history)
        p.report.update(trl_args=json.loads(p.args.to_json_string()), packages=package_versions(),
                        metrics=result.metrics, log_history=trainer.state.log_history, reward_history=history,
                        resumed_from=resume, seconds=round(time.perf_counter() - t0, 1))
        store.write_json(p.report, out / "factory_train.json")
        last = history[-1] if history else {}
        log(f"grpo: saved {out} ({p.report['seconds']} s; last accuracy reward {last.get('accuracy', float('nan')):.3f})")
    return p.report
