"""A synthetic reasoning domain: multi-step arithmetic word problems, with gold traces and a
checker that knows whether every step of any trace is right.

A problem is a start value and a chain of operations (+, -, * by 2..9) whose running value
stays within 0..99; its level is the number of operations (1..6). The same chain is put in
several surface phrasings. The gold trace is R1-shaped: one step per operation inside
`<think>`, steps separated by blank lines, then `\\boxed{answer}`:

    <think>
    7 + 3 = 10

    10 * 2 = 20
    </think>
    \\boxed{20}

`step_labels` checks each step of a (possibly wrong) trace against the chain: step i is right
when it applies operation i to the true running value and gets the true result. That gives
ground-truth PRM labels in ProcessBench's form (first wrong step, or -1) for any trace.

    python -m factory.demo.arith data/arith     # writes train.jsonl and heldout.jsonl
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
LEVELS = (1, 2, 3, 4, 5, 6)
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
ITEMS = ["apples", "coins", "stamps", "marbles", "cards", "shells"]

VERBS = {  # how each phrasing says "apply op with operand n"
    "plain": {"+": "add {n}", "-": "subtract {n}", "*": "multiply by {n}"},
    "story": {"+": "gets {n} more", "-": "gives away {n}", "*": "ends up with {n} times as many"},
    "terse": {"+": "plus {n}", "-": "minus {n}", "*": "times {n}"},
}


def make_chain(rng: random.Random, level: int, max_value: int = 99) -> tuple[int, list[tuple[str, int]]]:
    """A start value and `level` operations keeping the running value in 0..max_value."""
    start = rng.randint(2, 9)
    value, ops = start, []
    for _ in range(level):
        choices = [(op, n) for op in OPS for n in range(2, 10) if 0 <= OPS[op](value, n) <= max_value]
        op, n = rng.choice(choices)
        value = OPS[op](value, n)
        ops.append((op, n))
    return start, ops


def run_chain(start: int, ops: list[tuple[str, int]]) -> list[int]:
    """Running values after each operation."""
    out, v = [], start
    for op, n in ops:
        v = OPS[op](v, n)
        out.append(v)
    return out


def phrase(start: int, ops: list[tuple[str, int]], style: str, rng: random.Random) -> str:
    if style == "expression":
        expr = str(start)
        for op, n in ops:
            expr = f"({expr} {op} {n})" if len(ops) > 1 else f"{expr} {op} {n}"
        return f"Compute {expr[1:-1] if expr.startswith('(') else expr}."
    steps = [VERBS[style][op].format(n=n) for op, n in ops]
    if style == "story":
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        return f"{name} has {start} {item}. Then {name} " + ", then ".join(steps) + f". How many {item} now?"
    lead = "Start with" if style == "plain" else "Take"
    return f"{lead} {start}. " + ", then ".join(s[0].upper() + s[1:] if i == 0 else s for i, s in enumerate(steps)) + \
        ". What is the result?"


def gold_trace(start: int, ops: list[tuple[str, int]]) -> str:
    values, v, steps = run_chain(start, ops), start, []
    for (op, n), new in zip(ops, values):
        steps.append(f"{v} {op} {n} = {new}")
        v = new
    return "<think>\n" + "\n\n".join(steps) + "\n</think>\n\\boxed{" + str(v) + "}"


ASIDES = ["Wait, let me check that again.", "Hmm, that looks right, but I want to be sure.",
          "Let me verify each step from the start.", "Okay.", "So far so good."]


def long_reasoning(start: int, ops: list[tuple[str, int]], num_steps: int, rng: random.Random) -> str:
    """An R1-length reasoning for a chain (no think tags): the chain worked once, then checked
    again and again from the start ("Checking: 7 + 3 = 10, which matches."), with one-line
    asides between passes, until it has `num_steps` blank-line separated paragraphs. Every step
    is right: these are for reading long traces (PRM windows), not for labels."""
    values, steps = run_chain(start, ops), []
    while len(steps) < num_steps:
        v = start
        for i, ((op, n), new) in enumerate(zip(ops, values)):
            steps.append(f"{v} {op} {n} = {new}" if not steps or len(steps) < len(ops) else
                         f"Checking step {i + 1}: {v} {op} {n} = {new}, which matches.")
            v = new
        steps.append(rng.choice(ASIDES))
    return "\n\n".join(steps[:num_steps])


def phrasing(source: str) -> str:
    """The phrasing (style) of a problem from its `source` ("arith/<style>")."""
    return source.split("/", 1)[-1]


def make_problem(rng: random.Random, level: int) -> dict:
    start, ops = make_chain(rng, level)
    style = rng.choice(["plain", "story", "terse", "expression"])
    question = phrase(start, ops, style, rng)
    chain = {"start": start, "ops": [[op, n] for op, n in ops]}
    pid = "arith-" + hashlib.sha256(json.dumps([question, chain]).encode()).hexdigest()[:12]
    return {"problem_id": pid, "question": question, "answer": str(run_chain(start, ops)[-1]),
            "domain": "numeric", "level": level, "source": f"arith/{style}", "chain": chain}


def make_problems(n: int, seed: int, levels: tuple[int, ...] = LEVELS) -> list[dict]:
    """`n` problems spread evenly over `levels`, distinct questions."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        p = make_problem(rng, levels[len(out) % len(levels)])
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


def step_labels(chain: dict, steps: list[str]) -> tuple[list[int], int]:
    """Ground truth for each step of a trace (1 right, 0 wrong) and ProcessBench's first_error.

    Step i is right when it reads "v op n = r" with v the true running value before operation i,
    (op, n) operation i, and r the true result. Steps past the chain are wrong. A trace whose
    steps are all right but stops short has its last step marked as the error (it ended the
    chain early, which is what makes its answer wrong).
    """
    values = [chain["start"]] + run_chain(chain["start"], [tuple(o) for o in chain["ops"]])
    labels = []
    for i, s in enumerate(steps):
        m = STEP.match(s)
        ok = (m is not None and i < len(chain["ops"]) and int(m.group(1)) == values[i]
              and m.group(2) == chain["ops"][i][0] and int(m.group(3)) == chain["ops"][i][1]
              and int(m.group(4)) == values[i + 1])
        labels.append(int(ok))
    first = next((i for i, lab in enumerate(labels) if lab == 0), -1)
    if first == -1 and steps and len(steps) < len(chain["ops"]):
        first = len(steps) - 1
        labels[first] = 0
    return labels, first


def write_sets(out_dir: str | Path, n_train: int = 600, n_heldout: int = 300, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl (split=test), disjoint questions."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = make_problems(n_train + n_heldout, seed)
    rng = random.Random(seed + 1)
    rng.shuffle(problems)
    train, held = problems[:n_train], problems[n_train:]
    for p in held:
        p["split"] = "test"
    paths = out / "train.jsonl", out / "heldout.jsonl"
    for path, rows in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: (r["level"], r["problem_id"]))))
    return paths


def add_training_problems(train_path: str | Path, heldout_path: str | Path, n: int, seed: int) -> Path:
    """Append `n` more problems (drawn with `seed`) to train.jsonl, none sharing a question with
    either set; the file stays sorted by (level, problem_id)."""
    train_path = Path(train_path)
    sets = [[json.loads(l) for l in Path(f).read_text().splitlines()] for f in (train_path, heldout_path)]
    taken = {r["question"] for rows in sets for r in rows}
    extra = [p for p in make_problems(2 * n, seed) if p["question"] not in taken][:n]
    if len(extra) < n:
        raise ValueError(f"only {len(extra)} new questions among {2 * n} drawn with seed {seed}; asked for {n}")
    rows = sorted(sets[0] + extra, key=lambda r: (r["level"], r["problem_id"]))
    train_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train_path


if __name__ == "__main__":
    import sys

    print(*write_sets(sys.argv[1] if len(sys.argv) > 1 else "data/arith"))
