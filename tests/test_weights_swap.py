"""VLLMEngine.load_weights: another checkpoint of the same architecture swapped into a running
engine generates what that checkpoint generates (checked against transformers, greedy, both in
float32), and swapping back restores the first model's outputs exactly."""

from __future__ import annotations

import shutil

import pytest
import torch

from factory.engines import Sampling


def greedy_hf(model_dir, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
        out.append(gen[0, len(ids):].tolist())
    return out


def test_swapped_weights_generate_like_that_checkpoint(engine, teacher_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(teacher_dir, other)
    weights = load_file(other / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in weights.items()}, other / "model.safetensors")
    prompts = engine.tokenize([engine.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}])
                               for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 0), (2, 7), (4, 4), (6, 1)]])
    greedy = [Sampling(n=1, temperature=0.0, top_p=1.0, max_tokens=12, seed=0)] * len(prompts)
    before = engine.generate(prompts, greedy)
    tok = engine.tokenizer

    def ids(outs):
        return [tok(o[0].text, add_special_tokens=False)["input_ids"] for o in outs]

    try:
        engine.load_weights(str(other))
        assert engine.model_name == str(other)
        swapped = engine.generate(prompts, greedy)
        assert [o[0].text for o in swapped] != [o[0].text for o in before]  # the weights did change
        reference = greedy_hf(other, prompts, 12)
        same = sum(tok.decode(r, skip_special_tokens=True).strip() == o[0].text.strip()
                   for r, o in zip(reference, swapped))
        assert same >= len(prompts) - 1, (ids(swapped), reference)
    finally:
        engine.load_weights(str(teacher_dir))
    assert [o[0].text for o in engine.generate(prompts, greedy)] == [o[0].text for o in before]


def test_a_checkpoint_of_another_shape_is_refused(engine, teacher_dir, tmp_path):
    import json

    other = tmp_path / "wide"
    shutil.copytree(teacher_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["hidden_size"] *= 2
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size differ"):
        engine.load_weights(str(other))
    assert engine.model_name == str(teacher_dir)
