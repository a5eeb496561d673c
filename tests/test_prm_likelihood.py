"""The likelihood PRM (prm.likelihood): where each step's tokens are, its features against a direct
computation, batching, the head's fit and round trip, and scoring through PRMScorer."""

from __future__ import annotations

import pytest
import torch

from prm import likelihood, tiny
from prm.likelihood import FEATURES, Head, Rendering, encode, fit_head, trace_features
from prm.scorer import OK, STEP_EXCEEDS_CONTEXT, PRMConfig, PRMScorer

ITEMS = [
    ("What is 3 + 4?", ["3 + 4 = 7.", "So the answer is 7."]),
    ("Let x be the number of apples with 2x - 5 = 9. Find x.",
     ["2x - 5 = 9, so 2x = 14.", "Then x = 7.", "Check: 2 * 7 - 5 = 9.", "\\boxed{7}"]),
    ("Sum 12 and 30.", ["12 + 30 = 42."]),
]
RENDER = Rendering(system_prompt="Be brief.", question_template="Q: {question}")


@pytest.fixture(scope="module")
def lm():
    model, tok = tiny.lm_prm(seed=3)
    return model.eval(), tok


def test_spans_hold_each_step_as_the_policy_wrote_it(lm):
    _, tok = lm
    question, steps = ITEMS[1]
    ids, spans = encode(tok, RENDER, question, steps)
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": f"Q: {question}"}],
                                     tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids) == prompt + "<think>\n" + "\n\n".join(steps)
    assert [tok.decode(ids[a:b]) for a, b in spans] == [("\n\n" if i else "") + s for i, s in enumerate(steps)]
    assert spans[-1][1] == len(ids) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


def direct_features(model, tok, question, steps):
    """The eight features computed token by token from one unpadded forward pass."""
    ids, spans = encode(tok, RENDER, question, steps)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    rows, seen = [], []
    for a, b in spans:
        probs, margins = [], []
        for t in range(a, b):
            probs.append(logp[t - 1, ids[t]].item())
            margins.append(logp[t - 1, ids[t]].item() - logp[t - 1].max().item())
        own = [min(torch.tensor(probs).exp().tolist()), sum(probs) / len(probs), min(margins),
               float(any(m < 0 for m in margins))]
        seen.append(own)
        rows.append(own + [min(s[0] for s in seen), min(s[1] for s in seen), min(s[2] for s in seen),
                           max(s[3] for s in seen)])
    return torch.tensor(rows)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_features_equal_a_direct_computation_whatever_the_batch(lm, batch_size):
    model, tok = lm
    got = trace_features(model, tok, RENDER, ITEMS, batch_size, 512, "cpu")
    for (question, steps), (feats, n) in zip(ITEMS, got):
        assert feats.shape == (len(steps), len(FEATURES)) and n == len(encode(tok, RENDER, question, steps)[0])
        torch.testing.assert_close(feats, direct_features(model, tok, question, steps), atol=1e-5, rtol=1e-4)
    # a random model ranks few of these tokens first: off_top must see it
    assert any(f[:, 3].sum() > 0 for f, _ in got)


def test_too_long_traces_get_no_features(lm):
    model, tok = lm
    n = len(encode(tok, RENDER, *ITEMS[1])[0])
    got = trace_features(model, tok, RENDER, ITEMS, 2, n - 1, "cpu")
    assert got[1] == (None, n) and got[0][0] is not None and got[2][0] is not None


def test_head_fits_a_rule_and_survives_a_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(400, len(FEATURES), generator=g) * torch.linspace(1, 5, len(FEATURES))
    labels = (feats[:, 2] + 0.5 * feats[:, 5] > 0).float()  # right steps: a large margin
    head, loss = fit_head(feats, labels, RENDER, l2=1e-4)
    p = head.probabilities(feats)
    assert ((p > 0.5).float() == labels).float().mean() > 0.97 and loss < 0.1
    assert head.weights[2] > 0 and head.weights[5] > 0
    head.save(tmp_path)
    again = Head.load(tmp_path)
    assert again.rendering == RENDER
    torch.testing.assert_close(again.probabilities(feats), p)
    with pytest.raises(FileNotFoundError, match="no likelihood_prm.json"):
        Head.load(tmp_path / "elsewhere")


def test_scorer_reads_a_saved_likelihood_prm(lm, tmp_path):
    model, tok = lm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    feats = [f for f, _ in trace_features(model, tok, RENDER, ITEMS, 4, 512, "cpu")]
    head, _ = fit_head(torch.cat(feats), torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.float32), RENDER)
    head.save(tmp_path)
    results = PRMScorer(PRMConfig(model=str(tmp_path), family="likelihood", batch_size=2)).score(ITEMS)
    for f, res in zip(feats, results):
        assert res.status == OK
        assert res.scores == pytest.approx(head.probabilities(f).tolist(), abs=1e-5)
    # a context too short for the prompt and one step: that trace says so; the others are windowed
    prompt = len(likelihood.encode(tok, RENDER, ITEMS[0][0], [])[0])
    n = len(likelihood.encode(tok, RENDER, *ITEMS[1])[0])
    short = PRMScorer(PRMConfig(model=str(tmp_path), family="likelihood", max_length=prompt + 12,
                                cut_long_steps=False)).score(ITEMS)
    assert any(r.status == STEP_EXCEEDS_CONTEXT and r.scores is None for r in short)
    assert any(r.status == OK and r.windows > 1 for r in short) and n > prompt + 12
    with pytest.raises(ValueError, match="backend=vllm"):
        PRMScorer(PRMConfig(model=str(tmp_path), family="likelihood", backend="vllm"))
    assert likelihood.HEAD_FILE in {p.name for p in tmp_path.iterdir()}
