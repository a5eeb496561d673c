"""How many tokens a PRM can read, and where that figure comes from.

A PRM's context is its position table (`max_position_embeddings` in config.json), or its
tokenizer's `model_max_length` where that is lower. Reading past the table is not an option:
vLLM refuses to start, and transformers runs and returns scores computed at positions the
model never saw (Qwen2.5-Math-PRM-7B: 4096 positions, RoPE theta 10,000). Asking for more is
an error that names the recipe key and the model's limit; traces longer than the context are
read in windows (prm.windows), never cut.

Where the model is not on this machine (a dry run of a GPU recipe), the limit comes from the
Hugging Face cache when the model's config is there, else from KNOWN: the published figure of a
public PRM, recorded with its source. A model found nowhere is reported as unchecked, not
passed.
"""

from __future__ import annotations

import json
from pathlib import Path

# Figures from the models' published config.json, for checking recipes where the model is absent.
KNOWN = {
    # hub Qwen/Qwen2.5-Math-PRM-7B config.json: "max_position_embeddings": 4096, "rope_theta": 10000.0
    "Qwen/Qwen2.5-Math-PRM-7B": 4096,
}
_UNSET = 10**8  # transformers writes int(1e30) as model_max_length when a tokenizer does not say


def limit_from(max_position_embeddings: int | None, model_max_length: int | None) -> tuple[int | None, str]:
    """(the context, which field says so); (None, "") when neither is set."""
    found = []
    if max_position_embeddings:
        found.append((int(max_position_embeddings), f"max_position_embeddings {int(max_position_embeddings)} in its config.json"))
    if model_max_length and model_max_length < _UNSET:
        found.append((int(model_max_length), f"model_max_length {int(model_max_length)} in its tokenizer config"))
    return min(found) if found else (None, "")


def _read_json(path: Path | str | None) -> dict:
    if path is None or not isinstance(path, (str, Path)) or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text())


def find_limit(model: str) -> tuple[int | None, str]:
    """The context of `model` (a directory or a hub name) without loading it: (limit, source).
    limit is None when it cannot be found here; source then says why."""
    d = Path(model)
    if (d / "config.json").is_file():
        config, tok = _read_json(d / "config.json"), _read_json(d / "tokenizer_config.json")
        where = str(d)
    else:
        config, tok, where = {}, {}, None
        try:
            from huggingface_hub import try_to_load_from_cache

            config = _read_json(try_to_load_from_cache(model, "config.json"))
            tok = _read_json(try_to_load_from_cache(model, "tokenizer_config.json"))
            where = "the Hugging Face cache" if config else None
        except ValueError:  # not a hub name either
            pass
    if config:
        limit, field = limit_from(config.get("max_position_embeddings"), tok.get("model_max_length"))
        if limit is not None:
            return limit, f"{field} ({where})"
    if model in KNOWN:
        return KNOWN[model], (f"max_position_embeddings {KNOWN[model]} in its published config.json "
                              "(prm/context.py KNOWN; the model is not on this machine)")
    return None, f"{model} is not on this machine and its context is not recorded in prm/context.py"


def check_max_length(max_length: int | None, model: str, limit: int | None, source: str, key: str) -> None:
    """Raise when a recipe asks the PRM to read more than it can."""
    if max_length is not None and limit is not None and max_length > limit:
        raise ValueError(f"{key}={max_length}, but {model} reads at most {limit} tokens ({source}); set {key} "
                         f"to {limit} or less, or leave it unset: longer traces are scored in windows")
