"""PRM scorers of every family on tiny stand-ins: where scores are read, batching, counts, the
PRM's context, traces read in windows, and both public layouts through both backends."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from prm import tiny
from prm.scorer import OK, SEPARATOR_MISMATCH, STEP_EXCEEDS_CONTEXT, PRMConfig, PRMScorer, aggregates
from prm.steps import NO_REASONING, SplitConfig, split_and_merge, split_steps

from conftest import long_traces

ITEMS = [
    ("What is 3 + 4?", ["3 + 4 = 7.", "So the answer is 7."]),
    ("Let x be the number of apples with 2x - 5 = 9. Find x.",
     ["2x - 5 = 9, so 2x = 14.", "Then x = 7.", "Check: 2 * 7 - 5 = 9.", "\\boxed{7}"]),
    ("Sum 12 and 30.", ["12 + 30 = 42."]),
]


class PositionEcho(torch.nn.Module):
    """A model whose "correct" logit at each token is its position / 100 (all others 0), so a
    score s was read at position 100 * logit(s). Positions count real tokens only."""

    def __init__(self, width: int, index: int):
        super().__init__()
        self.width, self.index = width, index
        self.config = SimpleNamespace(max_position_embeddings=512)

    def forward(self, input_ids, attention_mask):
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0).float()
        logits = torch.zeros(*input_ids.shape, self.width)
        logits[..., self.index] = pos / 100
        return SimpleNamespace(logits=logits)


def echo_scorer(family: str, batch_size: int = 8) -> PRMScorer:
    if family == "classification":
        _, tok = tiny.classification_prm()
        return PRMScorer(PRMConfig(family=family, batch_size=batch_size), PositionEcho(2, 1), tok)
    _, tok = tiny.lm_prm()
    good = tok.encode("+", add_special_tokens=False)[0]
    return PRMScorer(PRMConfig(family=family, batch_size=batch_size), PositionEcho(len(tok), good), tok)


@pytest.mark.parametrize("family", ["classification", "lm"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_scores_are_read_exactly_at_the_step_tags(family, batch_size):
    scorer = echo_scorer(family, batch_size)
    for (question, steps), result in zip(ITEMS, scorer.score(ITEMS)):
        assert result.status == OK and len(result.scores) == len(steps)
        ids = scorer.encode(question, steps)
        read_at = [round(100 * math.log(s / (1 - s))) for s in result.scores]  # invert sigmoid(pos / 100)
        tags = [i for i, t in enumerate(ids) if t == scorer.tag_id]
        assert read_at == tags and len(tags) == len(steps)
        assert all(ids[p] == scorer.tag_id for p in read_at)


def test_inputs_follow_the_public_formats():
    cls, lm = echo_scorer("classification"), echo_scorer("lm")
    text = cls.render("Q?", ["a", "b"])
    assert text.startswith("<|im_start|>system\nPlease reason step by step")
    assert "<|im_start|>user\nQ?<|im_end|>" in text and "<|im_start|>assistant\na<extra_0>b<extra_0>" in text
    assert lm.render("Q?", ["a", "b"]) == "Q? a ки\nb ки"


@pytest.fixture(scope="module", params=["classification", "lm"])
def real_scorer(request, tmp_path_factory):
    """A random-weight PRM saved and loaded from disk like a downloaded one."""
    out = tmp_path_factory.mktemp("prm") / request.param
    (tiny.classification_prm if request.param == "classification" else tiny.lm_prm)(out)
    return PRMScorer(PRMConfig(model=str(out), family=request.param, batch_size=2))


def test_batched_equals_one_by_one(real_scorer):
    batched = real_scorer.score(ITEMS)
    for item, b in zip(ITEMS, batched):
        (single,) = real_scorer.score([item])
        assert single.status == b.status == OK and len(b.scores) == len(item[1])
        assert b.scores == pytest.approx(single.scores, abs=1e-5)
        assert all(0.0 < s < 1.0 for s in b.scores)


def test_traces_that_cannot_be_scored_say_why(real_scorer):
    tag = real_scorer.cfg.step_separator if real_scorer.cfg.family == "classification" else real_scorer.cfg.step_tag
    items = [(f"A question that contains {tag} itself", ["one step"]), ITEMS[0]]
    mismatch, fine = real_scorer.score(items)
    assert mismatch.status == SEPARATOR_MISMATCH and mismatch.scores is None and fine.status == OK
    # with cut_long_steps off, a step that cannot fit beside the question is the one thing too long to score
    cfg = PRMConfig(model=real_scorer.cfg.model, family=real_scorer.cfg.family, max_length=120, cut_long_steps=False)
    too_long, ok = PRMScorer(cfg).score([("Q?", ["x " * 200]), ("Q?", ["x " * 20] * 12)])
    assert too_long.status == STEP_EXCEEDS_CONTEXT and too_long.scores is None and too_long.num_tokens > 120
    assert ok.status == OK and len(ok.scores) == 12 and ok.windows > 1


def test_a_step_longer_than_the_context_is_read_in_pieces(real_scorer):
    """By default such a step is cut (at line breaks, then spaces) into pieces that fit; its
    score is its last piece's, read after the pieces before it, exactly as if the pieces were
    steps; the steps around it keep theirs."""
    from prm.steps import cut_step

    c = real_scorer.cfg
    cfg = PRMConfig(model=c.model, family=c.family, max_length=120)
    scorer = PRMScorer(cfg)
    long_step = "\n".join(f"line {k}: " + "x " * 9 for k in range(12)) + " y" * 80
    steps = ["first step", long_step, "last step"]
    (res,) = scorer.score([("Q?", steps)])
    assert res.status == OK and len(res.scores) == 3 and res.cut_steps == 1 and res.windows > 1
    assert res.num_tokens > 120 and res.tokens_read >= res.num_tokens
    count = lambda ts: [len(t) for t in scorer.tokenizer(ts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    enc = scorer._encode_many([("Q?", steps)])[0]
    room = 120 - (len(enc[0]) - sum(b - a for a, b in enc[1]))
    pieces = cut_step(long_step, (room - 4) // 2, count)
    assert "".join(pieces) == long_step and len(pieces) > 2
    (as_steps,) = scorer.score([("Q?", ["first step", *pieces, "last step"])])
    assert as_steps.status == OK and as_steps.cut_steps == 0
    assert res.scores == pytest.approx([as_steps.scores[0], as_steps.scores[len(pieces)], as_steps.scores[-1]], abs=1e-5)


def test_max_length_over_the_prms_context_is_an_error(real_scorer):
    cfg = PRMConfig(model=real_scorer.cfg.model, family=real_scorer.cfg.family, max_length=2048)
    with pytest.raises(ValueError, match=r"score\.prm\.max_length=2048, but .* reads at most 512 tokens "
                                         r"\(max_position_embeddings 512"):
        PRMScorer(cfg, key="score.prm")
    assert real_scorer.max_length == 512  # unset: the model's own


def test_tags_must_be_single_tokens(tmp_path):
    model, tok = tiny.lm_prm()
    with pytest.raises(ValueError, match="step_tag='<step>' is .* tokens"):
        PRMScorer(PRMConfig(family="lm", step_tag="<step>"), model, tok)


def test_aggregates():
    a = aggregates([0.9, 0.5, 0.8])
    assert a == pytest.approx({"prm_mean": 2.2 / 3, "prm_min": 0.5, "prm_prod": 0.36, "prm_last": 0.8})


@pytest.mark.parametrize("text,cfg,steps,status", [
    ("a\n\nb\n\n\n c ", SplitConfig(), ["a", "b", "c"], "ok"),
    ("a\nb\n\nc", SplitConfig(), ["a\nb", "c"], "ok"),
    ("a\nb\n\nc", SplitConfig(mode="newline"), ["a", "b", "c"], "ok"),
    ("Intro.\nStep 1: x.\nmore\nStep 2: y.", SplitConfig(mode="step_markers"),
     ["Intro.", "Step 1: x.\nmore", "Step 2: y."], "ok"),
    ("a; b; c", SplitConfig(mode="regex", pattern=r";\s*"), ["a", "b", "c"], "ok"),
    ("\n\n".join("abcdefghij" * 30), SplitConfig(), list("abcdefghij" * 30), "ok"),  # no ceiling on steps
    ("  \n ", SplitConfig(), [], NO_REASONING),
    (None, SplitConfig(), [], NO_REASONING),
])
def test_split_steps(text, cfg, steps, status):
    assert split_steps(text, cfg) == (steps, status)


def test_merging_joins_short_steps_up_to_a_token_size():
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731  (a "token" per word)
    text = "Wait.\n\nHmm.\n\nSo 2 + 2 = 4, and then 4 + 4 = 8 here.\n\nOk.\n\n\nThen 8.\n\nOne two three four five six seven eight nine ten eleven."
    steps, parts, status = split_and_merge(text, SplitConfig(merge_tokens=3), words)
    assert status == OK and parts == 6
    assert steps == ["Wait.\n\nHmm.", "So 2 + 2 = 4, and then 4 + 4 = 8 here.", "Ok.\n\n\nThen 8.",
                     "One two three four five six seven eight nine ten eleven."]  # the text between is kept
    assert split_and_merge(text, SplitConfig(merge_tokens=100), words)[0] == [text]
    assert split_and_merge(text, SplitConfig(), None)[0] == split_steps(text, SplitConfig())[0]
    with pytest.raises(ValueError, match="merge_tokens counts tokens"):
        split_steps(text, SplitConfig(merge_tokens=3))


# -- long traces, read in windows ----------------------------------------------------------

LAYOUTS = ["token_classification", "qwen_hub", "lm", "likelihood"]


def build_layout(layout: str, out) -> PRMConfig:
    """A random-weight PRM of `layout` in `out` (512 positions), float32."""
    if layout == "token_classification":
        tiny.classification_prm(out)
        return PRMConfig(model=str(out))
    if layout == "qwen_hub":
        tiny.qwen_prm(out)
        return PRMConfig(model=str(out), trust_remote_code=True)
    if layout == "lm":
        tiny.lm_prm(out)
        return PRMConfig(model=str(out), family="lm")
    from prm.likelihood import Head, Rendering, FEATURES

    model, tok = tiny.lm_prm(seed=3)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = len(FEATURES)
    Head(Rendering(), [0.0] * n, [1.0] * n, [0.5, 0.1, 0.3, -1.0, 0.2, 0.1, 0.2, -0.5], 0.1).save(out)
    return PRMConfig(model=str(out), family="likelihood")


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request, tmp_path_factory):
    return request.param, build_layout(request.param, tmp_path_factory.mktemp("prm") / request.param)


def whole(scorer: PRMScorer, question: str, steps: list[str]) -> list[float]:
    """The scores of a PRM reading the whole trace at once, past its context: what a PRM with
    a longer context would say (RoPE has no position table, so the tiny models can)."""
    from prm import likelihood

    ids, spans = scorer._encode_many([(question, steps)])[0]
    if scorer.cfg.family == "likelihood":
        logp, margin = likelihood.surprise(scorer.model, [ids], 1, scorer.pad_id, "cpu")[0]
        return scorer.head.probabilities(likelihood.step_features(logp, margin, spans)).tolist()
    return scorer.step_probabilities([ids])[0, [b - 1 for _, b in spans]].tolist()


def test_every_step_of_a_long_trace_is_scored(layout):
    name, cfg = layout
    scorer = PRMScorer(cfg)
    rows = long_traces((3, 5, 40, 150, 300))
    items = [(r["question"], split_steps(r["reasoning"], SplitConfig())[0]) for r in rows]
    results = scorer.score(items)
    assert max(r.num_tokens for r in results) >= 8 * scorer.max_length  # the context is >= 8x shorter
    for (question, steps), res in zip(items, results):
        assert res.status == OK and len(res.scores) == len(steps) and all(0 < s < 1 for s in res.scores)
        assert res.tokens_read <= 1.5 * res.num_tokens + 2 * res.windows  # a token or two per window off the plan
        if res.num_tokens <= scorer.max_length:
            assert res.windows == 1 and res.min_context is None and res.tokens_read == res.num_tokens
            # read with the long ones, a trace that fits scores as it does alone
            assert res.scores == pytest.approx(scorer.score([(question, steps)])[0].scores, abs=1e-4)
            assert res.scores == pytest.approx(whole(scorer, question, steps), abs=1e-4)
            continue
        assert res.windows > 1 and res.min_context > 0
        if res.num_tokens < 2000:  # (reading the 6k-token ones whole is slow on a CPU)
            # the first window reads the trace's own beginning: its steps score as in the whole trace
            first = res.plan[0].end
            assert res.scores[:first] == pytest.approx(whole(scorer, question, steps)[:first], abs=1e-4)


def test_batched_windows_equal_one_trace_at_a_time(layout):
    name, cfg = layout
    scorer = PRMScorer(PRMConfig(**{**cfg.__dict__, "batch_size": 3}))
    rows = long_traces((4, 30, 60))
    items = [(r["question"], split_steps(r["reasoning"], SplitConfig())[0]) for r in rows]
    together = scorer.score(items)
    for item, t in zip(items, together):
        (alone,) = scorer.score([item])
        assert t.plan == alone.plan and t.scores == pytest.approx(alone.scores, abs=1e-4)


# each layout starts an engine of its own (~1 min here): the hub layout, the one users pick, runs
# by default, the other two with `-m slow` (the default suite stays under 20 minutes)
@pytest.mark.parametrize("name", [pytest.param("token_classification", marks=pytest.mark.slow), "qwen_hub",
                                  pytest.param("lm", marks=pytest.mark.slow)])
def test_vllm_pooling_backend_reads_long_traces_as_transformers_does(name, tmp_path):
    """vLLM's token_classify runner, float32, on traces up to 12x its 512-token context: the
    Qwen2ForTokenClassification PRM `prm train` writes, the Qwen2.5-Math-PRM hub layout (vLLM's
    own Qwen2ForProcessRewardModel, the config read through the directory's code) and the
    Math-Shepherd layout (a causal LM, read through a head of its `+` / `-` LM-head rows)."""
    cfg = build_layout(name, tmp_path / name)
    rows = long_traces((3, 40, 300))
    items = [(r["question"], split_steps(r["reasoning"], SplitConfig())[0]) for r in rows]
    ref = PRMScorer(cfg).score(items)
    # eager (score.prm.extra, passed to vLLM's LLM): no torch.compile at start; the teacher's engine covers compiled
    scorer = PRMScorer(PRMConfig(**{**cfg.__dict__, "backend": "vllm", "extra": {"enforce_eager": True}}))
    assert scorer.model.llm.llm_engine.vllm_config.model_config.enforce_eager
    try:
        got = scorer.score(items)
    finally:
        scorer.model.close()
    assert scorer.model.max_model_len == scorer.max_length == 512
    assert max(r.num_tokens for r in got) >= 8 * 512
    for (_, steps), r, g in zip(items, ref, got):
        assert g.status == r.status == OK and len(g.scores) == len(steps) and g.plan == r.plan
        assert g.scores == pytest.approx(r.scores, abs=1e-3)
