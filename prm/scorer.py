"""Process reward models: a score per reasoning step, read from a local model directory.

Three families of PRMs, which differ in where and how a step's score is read:

    classification  Qwen2.5-Math-PRM style: the steps are joined by a separator token
                    (`<extra_0>`) inside the chat template (system, user = question,
                    assistant = steps); a token-classification head gives 2 logits per
                    token, and a step's score is softmax(logits)[1] at its separator. Loads
                    Qwen2ForTokenClassification checkpoints and the hub layout
                    (Qwen2ForProcessRewardModel, its own modelling code: trust_remote_code).
    lm              Math-Shepherd style: a causal LM reads "question step1 ки\nstep2 ки";
                    a step's score is softmax over the logits of the `+` and `-` tokens
                    at its tag position, taking `+`.
    likelihood      ours (prm.likelihood): a causal LM reads the trace in the policy's own
                    format; a head fitted on step labels turns its surprise at each step's
                    tokens into the step's score.

Backends: transformers (batched with sequences sorted by length, softmax in float32), and for
the classification and lm families vLLM's pooling runner (`token_classify`, factory.engines;
an lm PRM is read through a 2-way head made of its `+` / `-` rows of the LM head, the same
softmax). The PRM's context is read from its config and tokenizer; a `max_length` over it is
an error. A trace longer than the context is read in windows (prm.windows): each step is scored
once, in the window that gives it the most preceding context, and a trace that fits is read
whole, exactly as before. The scorer checks that the separators it reads equal the steps (a
question holding the tag, or a tokenizer that merges it, would otherwise shift every score);
traces that fail come back with a status and no scores, never with scores that belong to other
tokens. A step too long to fit beside the question is read in pieces (`cut_long_steps`); with
that off, such a trace comes back unscored too.

    scorer = PRMScorer(PRMConfig(model="path/to/prm"))
    results = scorer.score([(question, steps), ...])     # -> [StepScores(scores, status, ...)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# torch and prm.likelihood (which needs torch) are imported where a scorer is built or reads: the
# recipe's loader imports this module for PRMConfig, and every CLI start would pay torch's ~2 s
from prm import context
from prm.steps import cut_step
from prm.windows import Window, least_context, plan_windows

FAMILIES = ("classification", "lm", "likelihood")
OK, SEPARATOR_MISMATCH, STEP_EXCEEDS_CONTEXT = "ok", "separator_mismatch", "step_exceeds_context"
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class PRMConfig:
    model: str = ""
    """Local PRM directory (config, weights, tokenizer)."""
    family: str = "classification"
    """classification (Qwen2.5-Math-PRM style) | lm (Math-Shepherd style) | likelihood (prm.likelihood)."""
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
    """transformers | vllm (classification and lm families: vLLM's token_classify pooling runner)."""
    batch_size: int = 8
    """Sequences per forward pass (transformers backend)."""
    max_length: int | None = None
    """Tokens the PRM reads at once; None: its context (config max_position_embeddings, or the
    tokenizer's model_max_length if lower). More than that is an error. Longer traces are
    scored in windows of this size."""
    window_read_factor: float = 1.5
    """A trace longer than max_length is read in windows that total at most this many times its
    own tokens (prompt included): the larger, the more preceding context each window gives the
    steps it scores (prm.windows)."""
    cut_long_steps: bool = True
    """A step too long to fit beside the question is read in pieces (cut at line breaks, then
    spaces: prm.steps.cut_step) of at most half the room, and its score is that of its last
    piece, read after the pieces before it. False: such a trace is not scored
    (step_exceeds_context)."""
    dtype: str = "float32"
    """Weights dtype (bfloat16 on GPU); softmax is always float32."""
    device: str | None = None
    """cuda, cpu, ...; None: cuda when available."""
    trust_remote_code: bool = False
    """Needed for PRMs shipped with their own modelling code (Qwen2.5-Math-PRM's hub repo)."""
    extra: dict = field(default_factory=dict)
    """backend vllm: more keyword arguments for vLLM's LLM (enforce_eager, gpu_memory_utilization,
    tensor_parallel_size, ...), as engine.extra is for the teacher."""


@dataclass
class StepScores:
    scores: list[float] | None  # one per step, None when the trace could not be scored
    status: str  # ok | separator_mismatch | step_exceeds_context
    num_tokens: int  # the trace rendered once for the PRM
    windows: int = 0  # PRM inputs it was read in (1: whole)
    min_context: int | None = None  # fewest preceding-step tokens a step was scored with; None: none was cut
    tokens_read: int = 0  # tokens of all its windows
    plan: list[Window] | None = None  # the windows (prm.windows), steps indexed in the trace
    cut_steps: int = 0  # steps too long for the context, read in pieces (prm.cut_long_steps)


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


Encoded = tuple[list[int], list[tuple[int, int]]]  # token ids, and each step's [start, end) in them


class PRMScorer:
    """Scores steps with a PRM; pass `model` and `tokenizer` to reuse loaded ones. `key` is how
    errors name the config (score.prm in a pipeline recipe)."""

    def __init__(self, cfg: PRMConfig, model=None, tokenizer=None, key: str = "prm"):
        if cfg.family not in FAMILIES:
            raise ValueError(f"{key}.family={cfg.family!r}; use one of {', '.join(FAMILIES)}")
        if cfg.backend not in ("transformers", "vllm"):
            raise ValueError(f"{key}.backend={cfg.backend!r}; use transformers or vllm")
        if cfg.backend == "vllm" and cfg.family == "likelihood":
            raise ValueError(f"{key}.backend=vllm reads classification and lm PRMs; use transformers for family=likelihood")
        if cfg.window_read_factor < 1:
            raise ValueError(f"{key}.window_read_factor={cfg.window_read_factor}: windows read each step at least "
                             "once, so it is 1 or more")
        self.cfg = cfg
        import torch

        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if tokenizer is None:
            from transformers import AutoTokenizer

            if not cfg.model:
                raise ValueError(f"{key}.model is empty: name a local PRM directory")
            try:
                tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
            except OSError as e:
                raise FileNotFoundError(f"{key}.model={cfg.model!r}: not a local model directory, and not loadable "
                                        f"from the hub ({str(e).splitlines()[0]})") from None
        self.tokenizer = tokenizer
        if cfg.family == "likelihood":
            from prm import likelihood

            self.head = likelihood.Head.load(cfg.model)
        elif cfg.family == "classification":
            self.tag_id = _single_token(tokenizer, cfg.step_separator, "step_separator")
        else:
            self.tag_id = _single_token(tokenizer, cfg.step_tag, "step_tag")
            self.good_id = _single_token(tokenizer, cfg.good_token, "good_token")
            self.bad_id = _single_token(tokenizer, cfg.bad_token, "bad_token")
        if model is not None:
            config = getattr(model, "config", None)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        limit, source = context.limit_from(getattr(config, "max_position_embeddings", None),
                                           getattr(tokenizer, "model_max_length", None))
        context.check_max_length(cfg.max_length, cfg.model or "this PRM", limit, source, f"{key}.max_length")
        self.max_length = cfg.max_length or limit
        if self.max_length is None:
            raise ValueError(f"{cfg.model}: its config gives no max_position_embeddings; set {key}.max_length")
        self.model = model if model is not None else self._load(config)
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._prompts: dict[str, int] = {}

    def _load(self, config):
        c = self.cfg
        if c.backend == "vllm":
            from factory.engines.inprocess import VLLMTokenClassifier

            # an lm PRM's score is a softmax over two rows of its LM head: vLLM builds that head
            tokens = ([self.tokenizer.convert_ids_to_tokens(t) for t in (self.good_id, self.bad_id)]
                      if c.family == "lm" else None)
            return VLLMTokenClassifier(c.model, self.tag_id, self.max_length, dtype=c.dtype,
                                       trust_remote_code=c.trust_remote_code, classifier_from_tokens=tokens,
                                       extra=c.extra)
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForTokenClassification

        kw = {"dtype": c.dtype, "trust_remote_code": c.trust_remote_code}
        if c.family in ("lm", "likelihood"):
            return AutoModelForCausalLM.from_pretrained(c.model, **kw).to(self.device)
        arch = (config.architectures or [""])[0]
        auto = AutoModel if arch.endswith("ForProcessRewardModel") else AutoModelForTokenClassification
        return auto.from_pretrained(c.model, **kw).to(self.device)

    # -- rendering ---------------------------------------------------------------------------

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

    def _prompt_tokens(self, question: str) -> int:
        """Tokens before the first step (system, question): for planning windows."""
        if question not in self._prompts:
            if self.cfg.family == "classification":
                mark = "\ue000"  # a private-use character: where the assistant's content begins
                text = self.render(question, [mark])
                text = text[: text.index(mark)]
            else:
                text = f"{question} "
            self._prompts[question] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._prompts[question]

    def _encode_many(self, items: list[tuple[str, list[str]]]) -> list[Encoded]:
        """Each trace's ids and its steps' spans: a step ends at its tag (classification, lm),
        or where its tokens end (likelihood). Tags miscounted give fewer or more spans."""
        if self.cfg.family == "likelihood":
            from prm import likelihood

            return likelihood.encode_many(self.tokenizer, self.head.rendering, items)
        out = []
        for q, steps in items:
            ids = self.encode(q, steps)
            ends = [p + 1 for p, t in enumerate(ids) if t == self.tag_id]
            starts = [min(self._prompt_tokens(q), ends[0] - 1)] + ends[:-1] if ends else []
            out.append((ids, list(zip(starts, ends))))
        return out

    # -- reading -----------------------------------------------------------------------------

    def step_probabilities(self, batch: list[list[int]]) -> torch.Tensor:
        """Per token, the probability that the step ending there is correct: [B, T] float32
        (transformers backend)."""
        import torch

        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):  # right padding: real tokens keep their positions
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
        with torch.no_grad():
            out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device))
        logits = (out.logits if hasattr(out, "logits") else out[0]).float()
        if self.cfg.family == "classification":
            return logits.softmax(-1)[..., self.cfg.positive_label].cpu()
        return logits[..., [self.good_id, self.bad_id]].softmax(-1)[..., 0].cpu()

    def _read(self, windows: list[tuple[Encoded, list[int]]]) -> list[list]:
        """For each (window's encoding, indexes of the steps it scores), per scored step: its
        probability (classification, lm) or its own likelihood features. Batched by length."""
        if self.cfg.family == "likelihood":
            from prm import likelihood

            got = likelihood.surprise(self.model, [ids for (ids, _), _ in windows], self.cfg.batch_size,
                                      self.pad_id, self.device)
            return [likelihood.own_features(logp, margin, [spans[k] for k in which])
                    for ((_, spans), which), (logp, margin) in zip(windows, got)]
        if self.cfg.backend == "vllm":  # one call: vLLM batches itself; it returns the tags' rows only
            label = self.cfg.positive_label if self.cfg.family == "classification" else 0  # lm: [good, bad]
            got = self.model.step_probs([ids for (ids, _), _ in windows]) if windows else []
            return [p[which, label].tolist() for p, (_, which) in zip(got, windows)]
        out: list = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: len(windows[i][0][0]))  # little padding
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = order[start: start + self.cfg.batch_size]
            probs = self.step_probabilities([windows[i][0][0] for i in chunk])
            for row, i in enumerate(chunk):
                (_, spans), which = windows[i]
                out[i] = probs[row, [spans[k][1] - 1 for k in which]].tolist()
        return out

    def _plan(self, question: str, steps: list[str], enc: Encoded) -> tuple[list[Window] | None, dict, bool]:
        """Windows for a trace longer than max_length, each encoded: (windows, their
        encodings by (start, end), whether a window's tags miscounted)."""
        ids, spans = enc
        lengths = [b - a for a, b in spans]
        prompt = len(ids) - sum(lengths)  # system, question and what follows the last step
        encoded: dict[tuple[int, int], Encoded] = {}

        def fits(a: int, b: int) -> bool:
            if (a, b) not in encoded:
                encoded[(a, b)] = self._encode_many([(question, steps[a:b])])[0]
            return len(encoded[(a, b)][0]) <= self.max_length

        plan = plan_windows(lengths, self.max_length - prompt, prompt, self.cfg.window_read_factor, fits)
        mismatch = plan is not None and any(len(encoded[(w.start, w.end)][1]) != w.end - w.start for w in plan)
        return plan, encoded, mismatch

    def score(self, items: list[tuple[str, list[str]]], cut: bool | None = None) -> list[StepScores]:
        """Scores for each (question, steps); order of the results = order of `items`. `cut`:
        read steps too long for the context in pieces (default: cfg.cut_long_steps)."""
        from prm import likelihood

        cut = self.cfg.cut_long_steps if cut is None else cut
        encoded = self._encode_many(items)
        results: list[StepScores | None] = [None] * len(items)
        cuts: dict[int, tuple[list[str], list[int], int]] = {}  # item: its pieces, each step's last piece, steps cut
        jobs, plans = [], {}  # jobs: (item, window's encoding, steps it scores)
        for i, ((q, steps), enc) in enumerate(zip(items, encoded)):
            n = len(enc[0])
            if len(enc[1]) != len(steps):
                results[i] = StepScores(None, SEPARATOR_MISMATCH, n)
                continue
            if n <= self.max_length:
                plan, by_span, mismatch = [Window(0, 0, len(steps))], {(0, len(steps)): enc}, False
            else:
                plan, by_span, mismatch = self._plan(q, steps, enc)
            if mismatch:
                results[i] = StepScores(None, SEPARATOR_MISMATCH, n)
                continue
            if plan is None:
                if cut and (pieces := self._cut(q, steps, enc)) is not None:
                    cuts[i] = pieces
                else:
                    results[i] = StepScores(None, STEP_EXCEEDS_CONTEXT, n)
                continue
            lengths = [b - a for a, b in enc[1]]
            plans[i] = (plan, least_context(plan, lengths), sum(len(by_span[(w.start, w.end)][0]) for w in plan))
            for w in plan:
                jobs.append((i, by_span[(w.start, w.end)], list(range(w.scored - w.start, w.end - w.start))))
        values = self._read([(enc, which) for _, enc, which in jobs])
        got: dict[int, list] = {}
        for (i, _, _), v in zip(jobs, values):  # a trace's windows come in order
            got.setdefault(i, []).extend(v)
        for i, (plan, least, read) in plans.items():
            v = got[i]
            scores = self.head.probabilities(likelihood.with_prefix(v)).tolist() if self.cfg.family == "likelihood" else v
            results[i] = StepScores(scores, OK, len(encoded[i][0]), len(plan), least, read, plan)
        if cuts:  # the pieces fit: read them as steps, and give each step its last piece's score
            got_cut = self.score([(items[i][0], pieces) for i, (pieces, _, _) in cuts.items()], cut=False)
            for (i, (_, last, n_cut)), res in zip(cuts.items(), got_cut):
                scores = [res.scores[k] for k in last] if res.status == OK else None
                results[i] = StepScores(scores, res.status, len(encoded[i][0]), res.windows, res.min_context,
                                        res.tokens_read, None, n_cut)
        return results

    def _cut(self, question: str, steps: list[str], enc: Encoded) -> tuple[list[str], list[int], int] | None:
        """The trace's steps with each one too long for the context cut into pieces of at most
        half the room beside the prompt: (pieces, index of each step's last piece, steps cut);
        None when the prompt leaves no room for a piece."""
        ids, spans = enc
        lengths = [b - a for a, b in spans]
        room = self.max_length - (len(ids) - sum(lengths))
        size = (room - 4) // 2  # a piece as encoded may come out a token or two over its units' count
        if size < 1:
            return None
        count = lambda texts: [len(t) for t in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
        pieces, last, n_cut = [], [], 0
        for step, n in zip(steps, lengths):
            if n > room - 4:
                pieces.extend(p for p in cut_step(step, size, count))
                n_cut += 1
            else:
                pieces.append(step)
            last.append(len(pieces) - 1)
        return (pieces, last, n_cut) if n_cut else None
