"""A likelihood PRM: a causal LM's surprise at each step's tokens, turned into a step score by a
small head fitted on step labels (Monte-Carlo or gold).

Why this family exists: on the demo domain, a classification-head PRM fine-tuned from the teacher
reaches ProcessBench F1 ~0.49 even on ground-truth labels (NOTES.md), while the teacher's own
token probabilities already separate its slips from its right steps: a wrong step almost always
holds a token the model itself did not rank first. Fine-tuning a 3-layer model to read that off
(compare what it predicts with what the next token is, then gather it at the step's end) did not
happen in any run we tried; computing it directly and fitting 8 weights does. It catches the
errors its LM would not have made; an error the LM would make itself, it scores as right.

A likelihood PRM is a directory: the causal LM, its tokenizer, and `likelihood_prm.json` with the
head (feature means, scales, weights, bias) and the rendering the features were measured in (the
policy's own format: chat template, question template, `<think>\\n`, steps joined by a blank
line). Scoring renders each trace that way, so the PRM reads the trace as the policy wrote it.

Features of step i (its tokens given everything before them):
    min_prob        lowest probability of one of its tokens
    mean_logprob    mean log-probability of its tokens
    min_margin      lowest (log p(token) - log p(the model's top token)); 0 when all are top-1
    off_top         1 if some token is not the model's top-1
and the same four over steps 1..i (min, min, min, max): the hard label says "every step so far
is right", so the head sees the prefix too.

    factory prm train RECIPE prm.family=likelihood   # base_model: the LM to read with
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HEAD_FILE = "likelihood_prm.json"
STEP_FEATURES = ("min_prob", "mean_logprob", "min_margin", "off_top")
FEATURES = STEP_FEATURES + tuple(f"prefix_{f}" for f in STEP_FEATURES)


@dataclass
class Rendering:
    """How a trace is laid out for the LM: the policy's format."""

    system_prompt: str | None = None
    question_template: str = "{question}"
    response_prefix: str = "<think>\n"
    step_join: str = "\n\n"


@dataclass
class Head:
    rendering: Rendering
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    features: tuple[str, ...] = FEATURES

    def save(self, directory: Path) -> None:
        d = asdict(self)
        d["features"] = list(self.features)
        (Path(directory) / HEAD_FILE).write_text(json.dumps(d, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "Head":
        path = Path(directory) / HEAD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {HEAD_FILE}; a likelihood PRM is made by "
                                    "`factory prm train` with prm.family=likelihood")
        d = json.loads(path.read_text())
        if tuple(d["features"]) != FEATURES:
            raise ValueError(f"{path}: features {d['features']} are not this version's {list(FEATURES)}")
        return cls(Rendering(**d["rendering"]), d["mean"], d["scale"], d["weights"], d["bias"])

    def probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, F] features -> [N] probability that the step (and every one before it) is right."""
        z = (feats - torch.tensor(self.mean)) / torch.tensor(self.scale)
        return torch.sigmoid(z @ torch.tensor(self.weights) + self.bias)


def _prompt_ids(tokenizer, rendering: Rendering, question: str) -> list[int]:
    r = rendering
    messages = ([{"role": "system", "content": r.system_prompt}] if r.system_prompt else []) + [
        {"role": "user", "content": r.question_template.format(question=question)}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt + r.response_prefix, add_special_tokens=False)["input_ids"]


def _assemble(prompt: list[int], pieces: list[list[int]]) -> tuple[list[int], list[tuple[int, int]]]:
    ids, spans = list(prompt), []
    for piece in pieces:
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    return ids, spans


def encode(tokenizer, rendering: Rendering, question: str, steps: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the rendered trace and each step's [start, end) token span (the joiner
    before a step belongs to it: it is the model's choice to go on)."""
    return encode_many(tokenizer, rendering, [(question, steps)])[0]


def encode_many(tokenizer, rendering: Rendering, items: list[tuple[str, list[str]]]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """`encode` for many traces: a question's prompt is rendered once (K traces share it) and
    all steps are tokenized in one batched call; the ids are the same as one by one."""
    prompts: dict[str, list[int]] = {}
    for q, _ in items:
        if q not in prompts:
            prompts[q] = _prompt_ids(tokenizer, rendering, q)
    texts = [(rendering.step_join if i else "") + step for _, steps in items for i, step in enumerate(steps)]
    pieces = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out, at = [], 0
    for q, steps in items:
        out.append(_assemble(prompts[q], pieces[at: at + len(steps)]))
        at += len(steps)
    return out


def token_surprise(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position t >= 1 of each row: log p(token t) and log p(token t) - log p(top token)
    ([B, T-1] each; index t-1 holds token t's values)."""
    lg = logits[:, :-1].float()
    tok = lg.gather(-1, input_ids[:, 1:, None].to(lg.device))[..., 0]
    return tok - lg.logsumexp(-1), tok - lg.max(-1).values


def own_features(logp: list[float], margin: list[float], spans: list[tuple[int, int]]) -> list[list[float]]:
    """The four features of each step over its own tokens (index t-1 of logp / margin holds
    token t, as `token_surprise` gives them)."""
    rows = []
    for a, b in spans:
        lp, mg = logp[a - 1: b - 1], margin[a - 1: b - 1]
        low = min(mg)
        rows.append([math.exp(min(lp)), sum(lp) / len(lp), low, float(low < 0)])
    return rows


def with_prefix(own: list[list[float]]) -> torch.Tensor:
    """[steps, 8]: each step's own four features and the same four over steps 1..i."""
    rows, prefix = [], None
    for f in own:
        prefix = f if prefix is None else [min(prefix[0], f[0]), min(prefix[1], f[1]),
                                           min(prefix[2], f[2]), max(prefix[3], f[3])]
        rows.append(f + prefix)
    return torch.tensor(rows, dtype=torch.float32).reshape(len(own), len(FEATURES))


def step_features(logp: list[float], margin: list[float], spans: list[tuple[int, int]]) -> torch.Tensor:
    """[steps, 8] features of one trace read in one pass."""
    return with_prefix(own_features(logp, margin, spans))


@torch.no_grad()
def surprise(model, sequences: list[list[int]], batch_size: int, pad: int, device: str) -> list[tuple[list[float], list[float]]]:
    """`token_surprise` of each sequence (log-probabilities and margins as lists), batched by
    length and right-padded; in the order given."""
    out: list = [None] * len(sequences)
    todo = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start: start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(sequences[i])
            input_ids[row, :n], attention[row, :n] = torch.tensor(sequences[i]), 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        logp, margin = (t.cpu().tolist() for t in token_surprise(logits, input_ids))
        for row, i in enumerate(chunk):
            out[i] = (logp[row], margin[row])
    return out


def trace_features(model, tokenizer, rendering: Rendering, items: list[tuple[str, list[str]]], batch_size: int,
                   max_length: int, device: str) -> list[tuple[torch.Tensor | None, int]]:
    """Per trace read whole, its [steps, 8] features (None when it is longer than `max_length`:
    training measures features on whole traces) and its token count. The scorer reads longer
    traces in windows (PRMScorer)."""
    encoded = encode_many(tokenizer, rendering, items)
    todo = [i for i, (ids, _) in enumerate(encoded) if len(ids) <= max_length]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    read = surprise(model, [encoded[i][0] for i in todo], batch_size, pad, device)
    feats: list[torch.Tensor | None] = [None] * len(items)
    for i, (logp, margin) in zip(todo, read):
        feats[i] = step_features(logp, margin, encoded[i][1])
    return [(f, len(ids)) for f, (ids, _) in zip(feats, encoded)]


def fit_head(feats: torch.Tensor, labels: torch.Tensor, rendering: Rendering, l2: float = 0.0) -> tuple[Head, float]:
    """Logistic regression of step labels on standardised features (L-BFGS, full batch; it is 8
    weights, a training loop would be overkill). Returns the head and its final mean loss."""
    mean, scale = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mean) / scale
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, labels) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(loss_fn)
    head = Head(rendering, mean.tolist(), scale.tolist(), w.detach().tolist(), b.item())
    return head, loss_fn().item()
