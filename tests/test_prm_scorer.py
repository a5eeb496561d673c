"""PRM scorers of both families on tiny stand-ins: where scores are read, batching, counts, limits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from prm import tiny
from prm.scorer import OK, SEPARATOR_MISMATCH, TOO_LONG, PRMConfig, PRMScorer, aggregates
from prm.steps import NO_REASONING, STEP_TOO_LONG, TOO_MANY_STEPS, SplitConfig, split_steps

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
    short = PRMScorer(PRMConfig(model=real_scorer.cfg.model, family=real_scorer.cfg.family, max_length=20))
    results = short.score(ITEMS)
    assert [r.status for r in results] == [TOO_LONG if r.num_tokens > 20 else OK for r in results]
    assert any(r.status == TOO_LONG for r in results) and all(r.scores is None for r in results if r.status != OK)


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
    ("a\n\nb\n\nc", SplitConfig(max_steps=2), ["a", "b", "c"], TOO_MANY_STEPS),
    ("a\n\n" + "x" * 50, SplitConfig(max_step_chars=10), ["a", "x" * 50], STEP_TOO_LONG),
    ("  \n ", SplitConfig(), [], NO_REASONING),
    (None, SplitConfig(), [], NO_REASONING),
])
def test_split_steps(text, cfg, steps, status):
    assert split_steps(text, cfg) == (steps, status)


def test_vllm_pooling_backend_agrees_with_transformers(tmp_path):
    """vLLM's token_classify runner on the Qwen2.5-Math-PRM-style stand-in (bf16 on CPU)."""
    out = tmp_path / "cls"
    tiny.classification_prm(out)
    ref = PRMScorer(PRMConfig(model=str(out))).score(ITEMS)
    scorer = PRMScorer(PRMConfig(model=str(out), backend="vllm", max_length=256))
    try:
        got = scorer.score(ITEMS)
    finally:
        scorer.model.close()
    for r, g in zip(ref, got):
        assert g.status == r.status == "ok" and len(g.scores) == len(r.scores)
        assert g.scores == pytest.approx(r.scores, abs=2e-2)
