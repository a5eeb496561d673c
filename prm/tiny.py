"""Tiny stand-ins for the public PRMs' formats, built from configs (nothing is downloaded).

    classification_prm(out)   Qwen2.5-Math-PRM format: Qwen2ForTokenClassification, 2 labels,
                              ChatML, `<extra_0>` as one added token
    lm_prm(out)               Math-Shepherd format: a causal LM whose tokenizer holds the tag
                              `ки` as one token and `+` / `-` as single tokens

Their weights are random: they test that scores are read in the right places, and they are the
starting point `prm.train` fine-tunes from when no base model is named.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2ForTokenClassification

from factory import tiny

QWEN_SEPARATOR, SHEPHERD_TAG = "<extra_0>", "ки"

CORPUS = [
    "What is 3 + 4? 3 + 4 = 7. So the answer is 7. The sum of 12 and 30 is 42.",
    "Let x be the number of apples. Then 2x - 5 = 9, so x = 7. Check: 2 * 7 - 5 = 9. + -",
    "Step 1: multiply 6 by 7 to get 42. Step 2: subtract 2 to get 40. \\boxed{40}",
] * 20


def prm_tokenizer(extra_tokens: list[str], corpus: list[str] = CORPUS) -> PreTrainedTokenizerFast:
    """The factory's byte-level BPE tokenizer (ChatML, digits split) plus the PRM's tag tokens."""
    tok = tiny.train_tokenizer(corpus)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    return tok


def _config(tok: PreTrainedTokenizerFast, hidden: int, layers: int, **kw) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)


def classification_prm(out: str | Path | None = None, hidden: int = 64, layers: int = 2, seed: int = 0,
                       tokenizer: PreTrainedTokenizerFast | None = None):
    """Random Qwen2ForTokenClassification with 2 labels and `<extra_0>` (saved to `out` if given)."""
    torch.manual_seed(seed)
    tok = tokenizer or prm_tokenizer([QWEN_SEPARATOR])
    model = Qwen2ForTokenClassification(_config(tok, hidden, layers, num_labels=2))
    if out is not None:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return model, tok


def lm_prm(out: str | Path | None = None, hidden: int = 64, layers: int = 2, seed: int = 0):
    """Random Qwen2ForCausalLM whose tokenizer has `ки`, `+` and `-` as single tokens."""
    torch.manual_seed(seed)
    tok = prm_tokenizer([SHEPHERD_TAG])
    model = Qwen2ForCausalLM(_config(tok, hidden, layers))
    if out is not None:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return model, tok
