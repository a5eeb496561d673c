"""Build the demo's problem sets and tiny models from scratch, deterministically (run once).

    python -m factory.demo_build data/demo [--teacher-steps 700] [--student-steps 120]

Writes into OUT:
    problems/train.jsonl, problems/heldout.jsonl   the arithmetic domain (factory.arith)
    teacher/    a Qwen2 (hidden 192, 3 layers) trained with `factory train sft` on gold traces
                until it is good on short chains and often wrong on long ones
    student/    the same architecture trained briefly: it knows the format, not the arithmetic
    prm/        a classification PRM fine-tuned from the teacher on Monte-Carlo step labels of
                the teacher's own traces (`factory prm label` / `train`)
    */CARD.md   how each was made, its size and measured accuracy

The models are trained by the project's own trainer (TRL's SFTTrainer through factory.train)
on a "gold" run directory: curriculum shards of gold traces in the pipeline's format.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pyarrow as pa

from factory import arith, schema, store, tiny
from factory import train as train_mod

QUESTION_TEMPLATE = "{question}"  # the demo's rollout.question_template: questions as they are


def gold_run(out: Path, problems: list[dict]) -> Path:
    """A run directory whose curriculum is the gold trace of every problem (shuffled order)."""
    rows = []
    for p in problems:
        ops = [tuple(o) for o in p["chain"]["ops"]]
        rows.append({"prompt": [{"role": "user", "content": QUESTION_TEMPLATE.format(question=p["question"])}],
                     "completion": [{"role": "assistant", "content": arith.gold_trace(p["chain"]["start"], ops)}],
                     "problem_id": p["problem_id"], "trace_id": p["problem_id"] + "-gold", "source": p["source"],
                     "domain": p["domain"], "level": p["level"], "answer": p["answer"], "num_tokens": 0,
                     "num_traces": 1, "num_correct": 1, "pass_rate": 1.0, "difficulty": p["level"] / 6,
                     "difficulty_bucket": p["level"]})
    store.write_parquet(schema.table(rows, schema.CURRICULUM), out / "curriculum" / "part-00000.parquet")
    store.write_json({"curriculum": [{"file": "curriculum/part-00000.parquet", "rows": len(rows)}], "pairs": []},
                     out / "manifest.json")
    return out


def fresh_model(out: Path, corpus: list[str], seed: int) -> Path:
    tok = tiny.train_tokenizer(corpus, vocab_size=384)
    model = tiny.build_model(tok, hidden_size=192, num_layers=3, num_heads=6, num_kv_heads=2,
                             max_position_embeddings=512, seed=seed)
    return tiny.save(model, tok, out)


def sft_from_gold(init: Path, run: Path, out: Path, steps: int, batch: int, lr: float, seed: int) -> dict:
    epochs = 1
    rows = json.loads((run / "manifest.json").read_text())["curriculum"][0]["rows"]
    while rows * epochs < steps * batch:
        epochs += 1
    recipe = train_mod.load_recipe("sft", None, [
        f"model.path={init}", f"data.run_dir={run}", "data.order.strategy=shuffled", f"data.order.epochs={epochs}",
        f"data.order.seed={seed}", f"train.output_dir={out}", f"train.learning_rate={lr}",
        f"train.per_device_train_batch_size={batch}", "train.lr_scheduler_type=cosine", "train.warmup_steps=0.05",
        "train.logging_steps=50", "train.save_steps=100000", f"train.seed={seed}",
        f"train.extra={{max_steps: {steps}}}"])
    return train_mod.train("sft", recipe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--teacher-steps", type=int, default=700)
    ap.add_argument("--student-steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out, t0 = args.out, time.time()
    train_path, held_path = arith.write_sets(out / "problems", seed=args.seed)
    taken = {json.loads(l)["question"] for p in (train_path, held_path) for l in p.read_text().splitlines()}
    corpus = [p for p in arith.make_problems(40000, seed=args.seed + 100) if p["question"] not in taken]
    work = out / "_build"
    shutil.rmtree(work, ignore_errors=True)
    run = gold_run(work / "gold_run", corpus)
    texts = [tiny.chat_prompt([{"role": "user", "content": p["question"]}]) +
             arith.gold_trace(p["chain"]["start"], [tuple(o) for o in p["chain"]["ops"]]) for p in corpus[:5000]]
    init = fresh_model(work / "init", texts, args.seed)
    for name, steps in (("teacher", args.teacher_steps), ("student", args.student_steps)):
        report = sft_from_gold(init, run, work / name, steps, batch=96, lr=3e-3, seed=args.seed)
        print(f"{name}: {steps} steps, loss {report['metrics']['train_loss']:.3f}, {report['seconds']} s")
    print(f"built in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
