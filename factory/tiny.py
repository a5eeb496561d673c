"""Tiny models built from scratch, for tests, benchmarks and the demo.

Nothing can be downloaded here, so the project makes its own: a byte-level BPE tokenizer
trained on a small corpus, and a Qwen2 causal LM built from a config (the architecture of
the real R1-distilled students, so vLLM and TRL load it through their ordinary paths).
`fit` runs a plain next-token loop so a model can learn a toy task in seconds; real
training goes through `factory train` (TRL).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# ChatML, as Qwen2 uses. The think tags are ordinary (non-special) added tokens, as in R1's
# tokenizer: special tokens are stripped by detokenization and the traces would lose them.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_prompt(messages: list[dict]) -> str:
    """CHAT_TEMPLATE rendered with a generation prompt, as the tokenizer will render it
    (same Jinja settings as transformers), without needing a tokenizer yet."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ChatML and think tokens.

    Digits are kept as single tokens (no merges across digits) so arithmetic stays learnable.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.add_tokens([AddedToken(THINK_OPEN, special=False), AddedToken(THINK_CLOSE, special=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 sized for a CPU (64 hidden, 2 layers: ~0.1M parameters).

    Heads are 32 wide: vLLM's CPU attention supports head sizes 32, 64, 80, ... and not 16.
    """
    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(IM_START),
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def fit(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    prompts: list[str] | None = None,
) -> list[float]:
    """Next-token training on whole texts; returns the loss per step. With `prompts` (one per
    text, a prefix of it) the loss is on what follows the prompt only."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    side, tokenizer.padding_side = tokenizer.padding_side, "right"  # prompt masks count from the left
    for _ in range(steps):
        pick = rng.sample(range(len(texts)), min(batch_size, len(texts)))
        batch = tokenizer([texts[i] for i in pick], padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for row, i in enumerate(pick if prompts is not None else []):
            labels[row, : len(tokenizer(prompts[i])["input_ids"])] = -100
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    tokenizer.padding_side = side
    return losses


def save(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --- a toy task: single-digit addition in the R1 format -----------------------------------


def addition_problems(n: int, seed: int = 0) -> list[dict]:
    """`n` problems 'What is a + b?' with a, b in 0..9 (repeats allowed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"question": f"What is {a} + {b}?", "answer": str(a + b), "a": a, "b": b})
    return out


def addition_trace(a: int, b: int) -> str:
    return f"{THINK_OPEN}\n{a} + {b} = {a + b}\n{THINK_CLOSE}\n\\boxed{{{a + b}}}"


TEACHER_STEPS = 300


def build_addition_teacher(out_dir: str | Path, steps: int = TEACHER_STEPS, seed: int = 0) -> Path:
    """A tiny teacher that learned the R1 format and part of single-digit addition.

    Under-trained on purpose: sampled at temperature 1 it is right on some draws and wrong
    on others, so 8 traces per problem give pass rates across the whole range.
    """
    probs = addition_problems(2000, seed=seed)
    chats = [chat_prompt([{"role": "user", "content": p["question"]}]) + addition_trace(p["a"], p["b"]) + IM_END
             for p in probs]
    tokenizer = train_tokenizer(chats)
    model = build_model(tokenizer, seed=seed)
    fit(model, tokenizer, chats, steps=steps, seed=seed)
    return save(model, tokenizer, out_dir)


# --- a toy rewriter: paraphrases and variants of the addition questions -------------------

PARAPHRASE_PROMPT, VARIANT_PROMPT = "Paraphrase: {question}", "Variant: {question}"


def addition_rewrites(a: int, b: int, rng: random.Random) -> tuple[str, str]:
    """(paraphrase, variant) targets for 'What is a + b?'. Some paraphrases are bad on purpose
    (another number, or the question unchanged) so the check has something to reject."""
    paraphrase = rng.choice([f"What is {b} + {a}?", f"What is {a} + {b}?", f"What is {a} plus {b}?",
                             f"What is {a} + {rng.randint(0, 9)}?"])
    variant = f"What is {rng.randint(0, 9)} + {rng.randint(0, 9)}?"
    return paraphrase, variant


def build_addition_rewriter(out_dir: str | Path, steps: int = 300, seed: int = 0) -> Path:
    """A tiny rewriter for the toy questions, used with rewrite.paraphrase_prompt=PARAPHRASE_PROMPT
    and rewrite.variant_prompt=VARIANT_PROMPT (a real rewriter gets the default, longer prompts)."""
    rng = random.Random(seed)
    chats = []
    for p in addition_problems(2000, seed=seed + 1):
        para, var = addition_rewrites(p["a"], p["b"], rng)
        for template, target in ((PARAPHRASE_PROMPT, para), (VARIANT_PROMPT, var)):
            chats.append(chat_prompt([{"role": "user", "content": template.format(question=p["question"])}]) + target + IM_END)
    tokenizer = train_tokenizer(chats)
    model = build_model(tokenizer, seed=seed)
    fit(model, tokenizer, chats, steps=steps, seed=seed)
    return save(model, tokenizer, out_dir)


# --- a toy judge: is a number in words the same as one in digits? -------------------------

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen seventeen eighteen").split()
JUDGE_PROMPT = "Reference: {reference}\nAnswer: {answer}\nSame?"
JUDGE_STEPS = 3000


def judge_reply(reference: int, answer: int) -> str:
    """The toy judge's reply: both values in words, then the verdict (it reasons before it
    answers). Words, not digits: a number word is one token, so "the same?" compares two
    tokens; in digits (one token each) the model learned to compare only the first."""
    return f"{NUMBER_WORDS[reference]} and {NUMBER_WORDS[answer]}: {'yes' if reference == answer else 'no'}"


def build_number_judge(out_dir: str | Path, steps: int = JUDGE_STEPS, seed: int = 0) -> Path:
    """A tiny judge for the toy additions' sums (0..18): the reference or the answer is written
    in words, the other in digits. It writes both values in digits, then yes or no; half its
    training negatives are off by one, the teacher's usual slip. Used with judge.template =
    JUDGE_PROMPT and a verdict read from the reply's end (tests/test_judge.py)."""
    rng = random.Random(seed)
    prompts, texts = [], []
    for _ in range(6000):
        n, r = rng.randint(0, 18), rng.random()
        near = [k for k in (n - 1, n + 1) if 0 <= k <= 18]
        m = n if r < 0.5 else rng.choice(near) if r < 0.75 else rng.choice([k for k in range(19) if k != n])
        ref, ans = (NUMBER_WORDS[n], str(m)) if rng.random() < 0.5 else (str(n), NUMBER_WORDS[m])
        prompt = chat_prompt([{"role": "user", "content": JUDGE_PROMPT.format(reference=ref, answer=ans)}])
        prompts.append(prompt)
        texts.append(prompt + judge_reply(n, m) + IM_END)
    tokenizer = train_tokenizer(texts)
    model = build_model(tokenizer, seed=seed)
    fit(model, tokenizer, texts, steps=steps, batch_size=64, seed=seed, prompts=prompts)
    return save(model, tokenizer, out_dir)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="build the tiny addition teacher or rewriter (skipped if present)")
    parser.add_argument("out_dir")
    parser.add_argument("--rewriter", action="store_true", help="build the toy rewriter instead of the teacher")
    parser.add_argument("--judge", action="store_true", help="build the toy judge (data/judge) instead of the teacher")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if (Path(args.out_dir) / "config.json").exists() and not args.force:
        print(f"{args.out_dir}: already built")
        return
    build = build_number_judge if args.judge else build_addition_rewriter if args.rewriter else build_addition_teacher
    steps = args.steps or (JUDGE_STEPS if args.judge else 300 if args.rewriter else TEACHER_STEPS)
    print(f"built {build(args.out_dir, steps=steps)}")


if __name__ == "__main__":
    main()
