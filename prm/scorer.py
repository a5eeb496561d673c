"""Process reward models: a score per reasoning step, read from a local model directory.

Two families of public PRMs, which differ in where and how a step's score is read:

    classification  Qwen2.5-Math-PRM style: the steps are joined by a separator token
                    (`<extra_0>`) inside the chat template (system, user = question,
                    assistant = steps); a token-classification head gives 2 logits per
                    token, and a step's score is softmax(logits)[1] at its separator.
    lm              Math-Shepherd style: a causal LM reads "question step1 ки\\nstep2 ки";
                    a step's score is softmax over the logits of the `+` and `-` tokens
                    at its tag position, taking `+`.
    likelihood      ours (prm.likelihood): a causal LM reads the trace in the policy's own
                    format; a head fitted on step labels turns its surprise at each step's
                    tokens into the step's score.

Backends: transformers (batched with sequences sorted by length, softmax in float32), and for
the classification family vLLM's pooling runner (`token_classify`, factory.engines). The
scorer checks that the number of separators it reads equals the number of steps (a question
holding the tag, or a tokenizer that merges it, would otherwise shift every score) and that
the input fits the PRM's context; traces that fail are returned with a status, never with
scores that belong to other tokens.

    scorer = PRMScorer(PRMConfig(model="path/to/prm"))
    results = scorer.score([(question, steps), ...])     # -> [StepScores(scores, status)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prm import likelihood

FAMILIES = ("classification", "lm", "likelihood")
OK, TOO_LONG, SEPARATOR_MISMATCH = "ok", "too_long", "separator_mismatch"
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class PRMConfig:
    model: str = ""
    """Local PRM directory (config, weights, tokenizer)."""
    family: str = "classification"
    """classification (Qwen2.5-Math-PRM style) | lm (Math-Shepherd style)."""
    step_separator: str = "<extra_0>"
    """classification: the token after each step, where its score is read."""
    positive_label: int = 1
    """classification: the head's label meaning "this step is correct"."""
    system_prompt: str | None = QWEN_PRM_SYSTEM
    """classification: system message of the chat the PRM was trained on (None: no system turn)."""
    step_tag: str = "ки"
    """lm: the tag token after each step, where its score is read."""
    good_token: str = "+"
    """lm: the token meaning "correct step"."""
    bad_token: str = "-"
    """lm: the token meaning "wrong step"."""
    backend: str = "transformers"
    """transformers | vllm (classification family only: vLLM's token_classify pooling runner)."""
    batch_size: int = 8
    """Sequences per forward pass (transformers backend)."""
    max_length: int | None = None
    """Tokens the PRM can read; None: the model's max_position_embeddings. Longer inputs get
    status too_long and no scores."""
    dtype: str = "float32"
    """Weights dtype (bfloat16 on GPU); softmax is always float32."""
    device: str | None = None
    """cuda, cpu, ...; None: cuda when available."""
    trust_remote_code: bool = False
    """Needed for PRMs shipped with their own modelling code (Qwen2.5-Math-PRM's hub repo)."""


@dataclass
class StepScores:
    scores: list[float] | None  # one per step, None when the trace could not be scored
    status: str  # ok | too_long | separator_mismatch
    num_tokens: int


def aggregates(scores: list[float]) -> dict[str, float]:
    """prm_mean (the seed recipe's filter), prm_min (weakest step), prm_prod (all steps right),
    prm_last (the step that reaches the answer)."""
    return {"prm_mean": sum(scores) / len(scores), "prm_min": min(scores),
            "prm_prod": math.prod(scores), "prm_last": scores[-1]}


def _single_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"prm.{what}={text!r} is {len(ids)} tokens for this tokenizer; it must be exactly one "
                         "(add it to the tokenizer, or name the token it has)")
    return ids[0]


class PRMScorer:
    """Scores steps with a PRM; pass `model` and `tokenizer` to reuse loaded ones."""

    def __init__(self, cfg: PRMConfig, model=None, tokenizer=None):
        if cfg.family not in FAMILIES:
            raise ValueError(f"prm.family={cfg.family!r}; use one of {', '.join(FAMILIES)}")
        if cfg.backend not in ("transformers", "vllm"):
            raise ValueError(f"prm.backend={cfg.backend!r}; use transformers or vllm")
        if cfg.backend == "vllm" and cfg.family != "classification":
            raise ValueError(f"prm.backend=vllm reads classification-head PRMs; use transformers for family={cfg.family}")
        self.cfg = cfg
        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if tokenizer is None:
            from transformers import AutoTokenizer

            if not cfg.model:
                raise ValueError("prm.model is empty: name a local PRM directory")
            try:
                tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
            except OSError as e:
                raise FileNotFoundError(f"prm.model={cfg.model!r}: not a local model directory, and not loadable "
                                        f"from the hub ({str(e).splitlines()[0]})") from None
        self.tokenizer = tokenizer
        self.model = model if model is not None else self._load()
        if hasattr(self.model, "eval"):
            self.model.eval()
        if cfg.family == "likelihood":
            self.head = likelihood.Head.load(cfg.model)
        elif cfg.family == "classification":
            self.tag_id = _single_token(tokenizer, cfg.step_separator, "step_separator")
        else:
            self.tag_id = _single_token(tokenizer, cfg.step_tag, "step_tag")
            self.good_id = _single_token(tokenizer, cfg.good_token, "good_token")
            self.bad_id = _single_token(tokenizer, cfg.bad_token, "bad_token")
        config = getattr(self.model, "config", None)
        self.max_length = (cfg.max_length or getattr(self.model, "max_model_len", None)
                           or getattr(config, "max_position_embeddings", None) or 4096)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _load(self):
        if self.cfg.backend == "vllm":
            from factory.engines.inprocess import VLLMTokenClassifier

            return VLLMTokenClassifier(self.cfg.model, self.cfg.max_length)
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForTokenClassification

        kw = {"dtype": self.cfg.dtype, "trust_remote_code": self.cfg.trust_remote_code}
        if self.cfg.family in ("lm", "likelihood"):
            return AutoModelForCausalLM.from_pretrained(self.cfg.model, **kw).to(self.device)
        arch = (AutoConfig.from_pretrained(self.cfg.model, trust_remote_code=self.cfg.trust_remote_code)
                .architectures or [""])[0]
        auto = AutoModel if arch.endswith("ForProcessRewardModel") else AutoModelForTokenClassification
        return auto.from_pretrained(self.cfg.model, **kw).to(self.device)

    def render(self, question: str, steps: list[str]) -> str:
        """The PRM's input text for one trace, a tag after every step."""
        c = self.cfg
        if c.family == "classification":
            messages = ([{"role": "system", "content": c.system_prompt}] if c.system_prompt else []) + [
                {"role": "user", "content": question},
                {"role": "assistant", "content": c.step_separator.join(steps) + c.step_separator}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return f"{question} " + "\n".join(f"{s} {c.step_tag}" for s in steps)

    def encode(self, question: str, steps: list[str]) -> list[int]:
        return self.tokenizer(self.render(question, steps), add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def step_probabilities(self, batch: list[list[int]]) -> torch.Tensor:
        """Per token, the probability that the step ending there is correct: [B, T] float32."""
        if self.cfg.backend == "vllm":
            width = max(len(ids) for ids in batch)
            out = torch.zeros(len(batch), width)
            for i, p in enumerate(self.model.token_probs(batch)):
                out[i, : p.shape[0]] = p[:, self.cfg.positive_label]
            return out
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):  # right padding: real tokens keep their positions
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device))
        logits = (out.logits if hasattr(out, "logits") else out[0]).float()
        if self.cfg.family == "classification":
            return logits.softmax(-1)[..., self.cfg.positive_label].cpu()
        return logits[..., [self.good_id, self.bad_id]].softmax(-1)[..., 0].cpu()

    def score(self, items: list[tuple[str, list[str]]]) -> list[StepScores]:
        """Scores for each (question, steps); order of the results = order of `items`."""
        if self.cfg.family == "likelihood":
            feats = likelihood.trace_features(self.model, self.tokenizer, self.head.rendering, items,
                                              self.cfg.batch_size, self.max_length, self.device)
            return [StepScores(None, TOO_LONG, n) if f is None else StepScores(self.head.probabilities(f).tolist(), OK, n)
                    for f, n in feats]
        encoded = [self.encode(q, steps) for q, steps in items]
        results: list[StepScores | None] = [None] * len(items)
        todo = []
        for i, ((_, steps), ids) in enumerate(zip(items, encoded)):
            if len(ids) > self.max_length:
                results[i] = StepScores(None, TOO_LONG, len(ids))
            elif sum(t == self.tag_id for t in ids) != len(steps):
                results[i] = StepScores(None, SEPARATOR_MISMATCH, len(ids))
            else:
                todo.append(i)
        todo.sort(key=lambda i: len(encoded[i]))  # similar lengths together: little padding
        for start in range(0, len(todo), self.cfg.batch_size):
            chunk = todo[start: start + self.cfg.batch_size]
            probs = self.step_probabilities([encoded[i] for i in chunk])
            for row, i in enumerate(chunk):
                ids = torch.tensor(encoded[i])
                at = (ids == self.tag_id).nonzero().flatten()
                results[i] = StepScores(probs[row, at].tolist(), OK, len(encoded[i]))
        return results
