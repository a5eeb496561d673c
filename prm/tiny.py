"""Tiny stand-ins for the public PRMs' formats, built from configs (nothing is downloaded).

    classification_prm(out)   Qwen2.5-Math-PRM format: Qwen2ForTokenClassification, 2 labels,
                              ChatML, `<extra_0>` as one added token
    qwen_prm(out)             Qwen2.5-Math-PRM's hub layout: Qwen2ForProcessRewardModel from its
                              own modelling code in the directory (config auto_map, loaded with
                              trust_remote_code; prm/remote_code/), `score` = Linear-ReLU-Linear
    lm_prm(out)               Math-Shepherd format: a causal LM whose tokenizer holds the tag
                              `ки` as one token and `+` / `-` as single tokens

`max_positions` sets the context (config max_position_embeddings) the scorer reads them with.

Their weights are random: they test that scores are read in the right places, and they are the
starting point `prm.train` fine-tunes from when no base model is named.
"""

from __future__ import annotations

import json
import shutil
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
    # the Qwen PRM's system prompt and the demo domain's words, so that a prompt is tens of
    # tokens, as with a real tokenizer, not a few hundred characters
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Start with 8. Take 5. Subtract 7, then add 3, then multiply by 9, then minus 2, plus 4, times 6. "
    "What is the result? Compute (8 - 7) * 9. Ana has 5 coins. Then Ana gets 9 more, gives away 8, "
    "ends up with 2 times as many. How many apples, stamps, marbles, cards, shells now?",
    "Checking step 3: 4 - 2 = 2, which matches. Wait, let me check that again. Hmm, that looks right, "
    "but I want to be sure. Let me verify each step from the start. Okay. So far so good.",
] * 20


def prm_tokenizer(extra_tokens: list[str], corpus: list[str] = CORPUS) -> PreTrainedTokenizerFast:
    """The factory's byte-level BPE tokenizer (ChatML, digits split) plus the PRM's tag tokens."""
    tok = tiny.train_tokenizer(corpus)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    return tok


REMOTE_CODE = Path(__file__).parent / "remote_code"


def _config(tok: PreTrainedTokenizerFast, hidden: int, layers: int, max_positions: int = 512, **kw) -> Qwen2Config:
    # 2 heads of 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... and not 16
    return Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=max_positions,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)


def classification_prm(out: str | Path | None = None, hidden: int = 64, layers: int = 2, seed: int = 0,
                       tokenizer: PreTrainedTokenizerFast | None = None, max_positions: int = 512):
    """Random Qwen2ForTokenClassification with 2 labels and `<extra_0>` (saved to `out` if given)."""
    torch.manual_seed(seed)
    tok = tokenizer or prm_tokenizer([QWEN_SEPARATOR])
    model = Qwen2ForTokenClassification(_config(tok, hidden, layers, max_positions, num_labels=2))
    if out is not None:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return model, tok


def qwen_prm(out: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0, max_positions: int = 512) -> Path:
    """A random PRM in Qwen2.5-Math-PRM-7B's hub layout, saved to `out`: config.json names
    Qwen2ForProcessRewardModel and maps AutoConfig / AutoModel to the modelling files copied
    beside it, so transformers builds it from that code (trust_remote_code) and vLLM from its
    own implementation of the architecture. Float32 weights (the real one ships bfloat16)."""
    from transformers import AutoConfig, AutoModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = prm_tokenizer([QWEN_SEPARATOR])
    for f in ("configuration_qwen2_rm.py", "modeling_qwen2_rm.py"):
        shutil.copy(REMOTE_CODE / f, out / f)
    config = _config(tok, hidden, layers, max_positions, num_labels=2).to_dict()
    config.update(architectures=["Qwen2ForProcessRewardModel"], tie_word_embeddings=False, dtype="float32",
                  auto_map={"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                            "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(out, trust_remote_code=True), trust_remote_code=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def lm_prm(out: str | Path | None = None, hidden: int = 64, layers: int = 2, seed: int = 0, max_positions: int = 512):
    """Random Qwen2ForCausalLM whose tokenizer has `ки`, `+` and `-` as single tokens."""
    torch.manual_seed(seed)
    tok = prm_tokenizer([SHEPHERD_TAG])
    model = Qwen2ForCausalLM(_config(tok, hidden, layers, max_positions))
    if out is not None:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return model, tok
