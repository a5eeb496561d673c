"""`factory train sft|dpo`: curriculum SFT and DPO of a student on a run's shards, on TRL.

In:  a factory run directory: RUN/curriculum/ (SFT, easy -> hard) or RUN/pairs/ (DPO).
Out: TRAIN.output_dir/ holding the trained model and tokenizer (loadable by vLLM; LoRA
     adapters are merged), `factory_train.json` (resolved recipe, TRL arguments, package
     versions, the exact shards consumed with their sha256, the length report, metrics),
     `order.jsonl` (the ids of the examples of every optimizer step, as the collator saw
     them) and `dropped_too_long.jsonl` (rows longer than max_length, never truncated).

    factory train sft recipes/demo_sft.yaml train.output_dir=runs/student-sft
    accelerate launch -m factory.cli train sft RECIPE      # several GPUs, same code

The training loops are TRL's SFTTrainer and DPOTrainer. The factory decides what they see
and in which order: `factory.training.curriculum` turns the curriculum into a list of row indices,
and the trainer reads it through a sequential sampler (no shuffling, no packing, which would
reorder rows across difficulties). Sequences are never cut: max_length is the data's
longest row unless set, and rows above a set max_length are dropped and listed, because a
truncated trace teaches a reasoning chain without its final answer.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import TrainerCallback

from factory import config as config_mod
from factory import console, store
from factory.training.curriculum import OrderConfig, training_order
from factory.training.params import check_train_only, restrict_training


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters instead of all weights (needs peft); merged into the saved model."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    """Module names that get adapters."""


@dataclass
class ModelConfig:
    path: str = ""
    """The model to train: a local directory (or a hub name where the hub is reachable)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `path`."""
    dtype: str = "auto"
    """Weights dtype when loading: auto | float32 | bfloat16."""
    attn_implementation: str | None = None
    """e.g. flash_attention_2 on GPU; None lets transformers choose (sdpa)."""
    config_overrides: dict = field(default_factory=dict)
    """Model config fields to change on load, e.g. {rope_theta: 300000, max_position_embeddings: 32768}
    to stretch a 4k-context base (Qwen2.5-Math) over long reasoning traces."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    train_only: list[str] = field(default_factory=list)
    """Train only the parameters whose names match one of these regular expressions (re.search);
    the rest stay frozen. Empty: all. E.g. ['^model\\.norm\\.weight$'] lets GRPO move the final norm's
    gains alone: on a tiny student, Adam's equal-sized steps on every weight turn a noisy policy
    gradient into noise everywhere (NOTES.md). Not with lora."""


@dataclass
class DataConfig:
    run_dir: str = ""
    """A finished `factory run` directory; SFT reads its curriculum/, DPO its pairs/."""
    order: OrderConfig = field(default_factory=OrderConfig)
    """In which order examples are seen (factory.training.curriculum)."""
    max_length: int | None = None
    """Token limit per sequence; None: the longest row of the data. Never truncates."""
    on_too_long: str = "drop"
    """Rows above max_length: drop (listed in dropped_too_long.jsonl) | error."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    """Where the model, checkpoints and reports go; a re-run resumes from the last checkpoint."""
    learning_rate: float = 1e-5
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03
    """Warm-up: a whole number of steps, or a share of all steps if below 1."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500
    """Checkpoint every N steps (the unit of resume)."""
    save_total_limit: int | None = 2
    bf16: bool = False
    """bfloat16 mixed precision (GPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: long traces fit at the cost of ~30% speed."""
    seed: int = 42
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """Experiment trackers (wandb, tensorboard, ...)."""
    extra: dict = field(default_factory=dict)
    """Other SFTConfig / DPOConfig fields, passed as they are."""


@dataclass
class DPOSettings:
    ref_model: str | None = None
    """The frozen reference policy; None: a second copy of model.path (the SFT output). Ignored
    with LoRA, where the reference is the base with adapters disabled."""
    beta: float = 0.1
    """KL strength: higher keeps the policy closer to the reference."""
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """TRL loss types (sigmoid = DPO, ipo, hinge, robust, ...); several are summed with loss_weights."""
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    """Conservative DPO / robust: assumed share of flipped preference labels."""


@dataclass
class SFTRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DPORecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(order=OrderConfig(strategy="shuffled")))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=5e-7))
    dpo: DPOSettings = field(default_factory=DPOSettings)


def load_recipe(kind: str, path: str | Path | None, overrides: list[str] = ()) -> SFTRecipe | DPORecipe:
    return config_mod.load({"sft": SFTRecipe, "dpo": DPORecipe}[kind], path, overrides)


# --- data -------------------------------------------------------------------------------


def read_run(run_dir: str, kind: str) -> tuple[pa.Table, dict]:
    """The run's curriculum (sft) or pairs (dpo) in shard order, and a manifest of the files."""
    run = Path(run_dir)
    manifest_path = run / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: not found; data.run_dir must be a finished `factory run` directory")
    manifest = json.loads(manifest_path.read_text())
    files = [s["file"] for s in manifest["curriculum"]] if kind == "sft" else manifest["pairs"]
    if not files:
        raise ValueError(f"{run}: the run produced no {'curriculum' if kind == 'sft' else 'pairs'} shards")
    tables = [pq.read_table(run / f) for f in files]
    data = pa.concat_tables(tables)
    if data.num_rows == 0:
        raise ValueError(f"{run}: {', '.join(files)} hold no rows to train on")
    consumed = {"run_dir": str(run.resolve()), "run_manifest_sha256": store.sha256_file(manifest_path),
                "files": [{"file": f, "rows": t.num_rows, "sha256": store.sha256_file(run / f)} for f, t in zip(files, tables)]}
    return data, consumed


def conversations(data: pa.Table, kind: str) -> list[list[dict]]:
    """The longest full conversation of each row (for DPO, the longer of chosen / rejected)."""
    prompts = data.column("prompt").to_pylist()
    if kind == "sft":
        return [p + c for p, c in zip(prompts, data.column("completion").to_pylist())]
    return [[p + c, p + r] for p, c, r in zip(prompts, data.column("chosen").to_pylist(),
                                               data.column("rejected").to_pylist())]


def sequence_lengths(tokenizer, convs: list, kind: str) -> list[int]:
    """Tokens per row as the trainer will see them (chat template applied)."""
    flat = convs if kind == "sft" else [c for pair in convs for c in pair]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in flat]
    lens = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return lens if kind == "sft" else [max(a, b) for a, b in zip(lens[::2], lens[1::2])]


def length_policy(lengths: list[int], cfg: DataConfig) -> tuple[int, list[int], list[int]]:
    """(max_length, kept row indices, too-long row indices); never truncates."""
    longest = max(lengths)
    max_length = cfg.max_length or longest
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long and cfg.on_too_long == "error":
        raise ValueError(f"{len(too_long)} rows are longer than data.max_length={max_length} (longest {longest} "
                         "tokens); raise max_length, or set data.on_too_long=drop to leave them out")
    if cfg.on_too_long not in ("drop", "error"):
        raise ValueError(f"data.on_too_long={cfg.on_too_long!r}; use drop or error")
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    if not keep:
        raise ValueError(f"every row is longer than data.max_length={max_length}")
    return max_length, keep, too_long


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# --- the order log ----------------------------------------------------------------------


class ConsoleProgress(TrainerCallback):
    """One live line on the terminal while transformers' own bar and log lines go to the log:
    optimizer steps done / total, the last logged loss, ETA."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def on_train_begin(self, args, state, control, **kw):
        self.bar = console.bar(state.max_steps, self.desc, "step", state.global_step)

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class OrderLog(TrainerCallback):
    """Wraps TRL's collator: notes the ids of every micro-batch it collates, then passes the batch
    on without our metadata columns. With a sequential sampler and no dataloader workers,
    collation order is training order. A record is written when its optimizer step ends (the
    dataloader collates one batch ahead, and that batch is not trained on if training stops);
    a resumed run keeps the records of the steps already done."""

    def __init__(self, collate: Callable, path: Path, grad_accum: int, id_columns: list[str], drop: set[str]):
        self.collate, self.path, self.grad_accum = collate, path, grad_accum
        self.id_columns, self.drop = id_columns, drop
        self.micro = 0
        self.pending: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.micro = state.global_step * self.grad_accum
        self.pending = []
        if self.path.exists():  # a resume: keep the finished steps' records
            kept = [l for l in self.path.read_text().splitlines() if json.loads(l)["step"] < state.global_step]
            self.path.write_text("".join(l + "\n" for l in kept))

    def on_step_end(self, args, state, control, **kwargs):
        done = [r for r in self.pending if r["step"] < state.global_step]
        self.pending = [r for r in self.pending if r["step"] >= state.global_step]
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in done)

    def __call__(self, examples: list[dict]) -> dict:
        rec = {"step": self.micro // self.grad_accum, "micro_batch": self.micro}
        rec.update({c: [e[c] for e in examples] for c in self.id_columns})
        self.pending.append(rec)
        self.micro += 1
        return self.collate([{k: v for k, v in e.items() if k not in self.drop} for e in examples])


def read_order(output_dir: str | Path) -> list[dict]:
    """The order log of a training run (rank 0), one record per micro-batch."""
    return [json.loads(l) for l in (Path(output_dir) / "order.jsonl").read_text().splitlines()]


# --- building the trainer ---------------------------------------------------------------


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.path
    if not name:
        raise ValueError("model.path is empty: name the model to train")
    tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_config(cfg: ModelConfig):
    """The model's config with `config_overrides` applied (unknown fields are errors)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.path)
    for k, v in cfg.config_overrides.items():
        rope = getattr(config, "rope_parameters", None)
        if k == "rope_theta" and isinstance(rope, dict):  # transformers 5 keeps it in rope_parameters
            rope["rope_theta"] = v
        elif hasattr(config, k):
            setattr(config, k, v)
        else:
            raise ValueError(f"model.config_overrides.{k}: {type(config).__name__} has no field {k!r}")
    return config


def load_model(cfg: ModelConfig):
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(cfg.path, config=model_config(cfg), dtype=cfg.dtype, **kwargs)


def peft_config(cfg: LoraConfig):
    if not cfg.enabled:
        return None
    try:
        from peft import LoraConfig as PeftLora
    except ImportError:
        raise ValueError("model.lora.enabled needs peft: pip install 'reasoning-factory[lora]'") from None
    return PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                    target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")


def trl_args(kind: str, recipe: SFTRecipe | DPORecipe, max_length: int):
    """TRL's config from ours: a sequential sampler over our order, one pass, no packing."""
    import torch
    from trl import DPOConfig, SFTConfig

    t = recipe.train
    common = dict(
        output_dir=t.output_dir, learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        bf16=t.bf16, gradient_checkpointing=t.gradient_checkpointing, seed=t.seed, report_to=list(t.report_to),
        max_length=max_length, num_train_epochs=1,  # epochs are already in the order
        train_sampling_strategy="sequential", remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    for k in ("num_train_epochs", "train_sampling_strategy", "remove_unused_columns", "dataloader_num_workers",
              "packing", "max_length", "shuffle_dataset"):
        if k in t.extra:
            raise ValueError(f"train.extra.{k} is set by the factory (the curriculum order depends on it); "
                             f"use data.order / data.max_length instead")
    if kind == "sft":
        return SFTConfig(**common, packing=False, shuffle_dataset=False, completion_only_loss=True, **t.extra)
    d = recipe.dpo
    return DPOConfig(**common, beta=d.beta, loss_type=list(d.loss_type), loss_weights=d.loss_weights,
                     label_smoothing=d.label_smoothing, **t.extra)


ID_COLUMNS = {"sft": ["problem_id", "trace_id"], "dpo": ["problem_id", "chosen_trace_id", "rejected_trace_id"]}
TEXT_COLUMNS = {"sft": ["prompt", "completion"], "dpo": ["prompt", "chosen", "rejected"]}


def last_checkpoint(output_dir: str) -> str | None:
    ckpts = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(ckpts[-1]) if ckpts else None


@dataclass
class Plan:
    """Everything decided before any weights are loaded."""

    kind: str
    data: pa.Table  # every row of the shards
    kept: pa.Table  # rows within max_length
    too_long: list[int]  # row indices left out
    lengths: list[int]
    order: list[int]  # indices into `kept`, one per example seen
    tokenizer: object
    args: object  # TRL's SFTConfig / DPOConfig
    report: dict
    dropped_by_trl: list[str] = field(default_factory=list)  # trace ids TRL left out (set by build_trainer)


def plan(kind: str, recipe: SFTRecipe | DPORecipe, log: Callable[[str], None] = console.say) -> Plan:
    """Read the shards, measure lengths, fix the order and build TRL's arguments."""
    check_train_only(recipe.model)
    data, consumed = read_run(recipe.data.run_dir, kind)
    tokenizer = load_tokenizer(recipe.model)
    lengths = sequence_lengths(tokenizer, conversations(data, kind), kind)
    max_length, keep, too_long = length_policy(lengths, recipe.data)
    kept = data.take(keep)
    per_step = recipe.train.per_device_train_batch_size * recipe.train.gradient_accumulation_steps * world_size()
    order = training_order(kept.column("difficulty").to_pylist(), recipe.data.order, per_step,
                           lengths=[lengths[i] for i in keep], micro_batch=recipe.train.per_device_train_batch_size)
    max_steps = recipe.train.extra.get("max_steps", -1)
    if max_steps and max_steps > 0:  # training stops there: the rest of the order would be tokenized for nothing
        order = order[: max_steps * per_step]
    args = trl_args(kind, recipe, max_length)
    report = {
        "kind": kind, "recipe": config_mod.to_dict(recipe), "data": consumed,
        "lengths": {"max_length": max_length, "longest": max(lengths), "rows": len(lengths),
                    "too_long": len(too_long), "mean": round(sum(lengths) / len(lengths), 1)},
        "order": {"strategy": recipe.data.order.strategy, "examples": len(order), "examples_per_step": per_step,
                  "steps": -(-len(order) // per_step)},
    }
    log(f"{kind}: {kept.num_rows} rows ({len(too_long)} longer than max_length={max_length} left out), "
        f"{len(order)} examples in {report['order']['steps']} steps, order={recipe.data.order.strategy}")
    return Plan(kind, data, kept, too_long, lengths, order, tokenizer, args, report)


def in_order(tokenized: list[str], kept: list[str], order: list[int]) -> list[int]:
    """The planned order (positions in the kept rows) as positions in TRL's tokenized rows, which
    are the kept rows less any TRL dropped (matched by trace id)."""
    if tokenized == kept:
        return order
    where = {t: i for i, t in enumerate(tokenized)}
    return [where[kept[k]] for k in order if kept[k] in where]


def build_trainer(recipe: SFTRecipe | DPORecipe, p: Plan):
    """TRL's trainer over the planned order, its collator wrapped by the order log."""
    import datasets

    kind, ids = p.kind, ID_COLUMNS[p.kind]
    used = sorted(set(p.order))  # the rows the order shows (max_steps may stop it early), each once
    at = {k: i for i, k in enumerate(used)}
    table = p.kept.select(TEXT_COLUMNS[kind] + ids).take(used)
    rows, order = datasets.Dataset(table), [at[k] for k in p.order]
    model = load_model(recipe.model)
    p.report["trainable"] = restrict_training(model, recipe.model)
    lora = peft_config(recipe.model.lora)
    if kind == "sft":
        from trl import SFTTrainer

        # TRL tokenizes each row once, then the rows are put in the planned order: an order of
        # several passes (2.375 in the demo) would otherwise be tokenized pass by pass. A row TRL
        # drops (its truncation left it without a completion token: the plan's lengths keep this
        # from happening, unless TRL counts tokens otherwise) leaves the order, and is counted in
        # the report and listed with its reason in dropped_too_long.jsonl
        trainer = SFTTrainer(model=model, args=p.args, train_dataset=rows, processing_class=p.tokenizer,
                             peft_config=lora)
        tokenized, planned = trainer.train_dataset["trace_id"], table.column("trace_id").to_pylist()
        p.dropped_by_trl = sorted(set(planned) - set(tokenized))
        p.report["lengths"]["dropped_by_trl"] = len(p.dropped_by_trl)
        if p.dropped_by_trl:
            console.say(f"sft: TRL left out {len(p.dropped_by_trl)} rows with no completion token after its "
                        f"truncation to max_length={p.args.max_length} (listed in dropped_too_long.jsonl)")
        trainer.train_dataset = trainer.train_dataset.select(in_order(tokenized, planned, order))
    else:
        from trl import DPOTrainer

        ref = None
        if lora is None:  # explicit reference: the SFT output (or dpo.ref_model), a frozen copy
            ref_path = recipe.dpo.ref_model or recipe.model.path
            ref = load_model(ModelConfig(**{**recipe.model.__dict__, "path": ref_path}))
        p.report["ref_model"] = "base with adapters disabled" if lora else str(recipe.dpo.ref_model or recipe.model.path)
        trainer = DPOTrainer(model=model, ref_model=ref, args=p.args, train_dataset=rows.select(order),
                             processing_class=p.tokenizer, peft_config=lora)
    out, rank = Path(recipe.train.output_dir), trainer.args.process_index
    order_log = OrderLog(trainer.data_collator, out / ("order.jsonl" if rank == 0 else f"order.rank{rank}.jsonl"),
                         p.args.gradient_accumulation_steps, ids, drop=set(TEXT_COLUMNS[kind] + ids))
    trainer.data_collator = order_log
    trainer.add_callback(order_log)
    if console.log_path() is not None:  # the terminal is quiet: show the steps there
        trainer.add_callback(ConsoleProgress(f"{kind} {Path(recipe.train.output_dir).name}"))
    return trainer


def write_dropped(p: Plan, out: Path) -> None:
    """out/dropped_too_long.jsonl: every row left out of training, with its reason."""
    ids = ID_COLUMNS[p.kind]
    with open(out / "dropped_too_long.jsonl", "w") as f:
        for i in p.too_long:
            f.write(json.dumps({c: p.data.column(c)[i].as_py() for c in ids} | {
                "tokens": p.lengths[i], "drop_reason": "longer_than_max_length"}) + "\n")
        if p.dropped_by_trl:
            problem_of = dict(zip(p.kept.column("trace_id").to_pylist(), p.kept.column("problem_id").to_pylist()))
        for trace_id in p.dropped_by_trl:
            f.write(json.dumps({"problem_id": problem_of[trace_id], "trace_id": trace_id,
                                "drop_reason": "no_completion_token_after_trl_truncation"}) + "\n")


def train(kind: str, recipe: SFTRecipe | DPORecipe, dry_run: bool = False, log: Callable[[str], None] = console.say) -> dict:
    """Train (or, with dry_run, plan without loading weights) and write the run's reports.

    Returns the report written to output_dir/factory_train.json (the plan, for a dry run).
    """
    t0 = time.perf_counter()
    p = plan(kind, recipe, log)
    if dry_run:
        p.report["trl_args"] = {k: str(v) for k, v in p.args.to_dict().items()}
        return p.report
    from factory.run.products import package_versions

    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(recipe, p)
    resume = last_checkpoint(str(out))
    if resume:
        log(f"{kind}: resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    if not recipe.model.lora.enabled:
        trainer.save_model(str(out))  # on every rank: FSDP / ZeRO-3 gather the weights here
    if trainer.is_world_process_zero():
        if recipe.model.lora.enabled:  # a plain model, so vLLM loads it without peft
            trainer.model.merge_and_unload().save_pretrained(out)
        p.tokenizer.save_pretrained(out)
        write_dropped(p, out)
        p.report.update(
            trl_args=json.loads(p.args.to_json_string()), packages=package_versions(),
            metrics=result.metrics, log_history=trainer.state.log_history, resumed_from=resume,
            seconds=round(time.perf_counter() - t0, 1))
        store.write_json(p.report, out / "factory_train.json")
        log(f"{kind}: saved {out} (loss {result.metrics.get('train_loss', float('nan')):.4f}, {p.report['seconds']} s)")
    return p.report
