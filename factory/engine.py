"""The inference engine a stage is handed: a small interface, and vLLM behind it.

This is the only module that imports vllm. Stages see `Engine`: render a chat, tokenize,
generate n samples per prompt. Other backends (an OpenAI-compatible server, a
pool of Ray replicas) implement the same three methods.

    engine = VLLMEngine(EngineConfig(model="path/to/model"))
    outs = engine.generate(prompts, [Sampling(n=8, temperature=0.6, top_p=0.95, max_tokens=4096, seed=1)])
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Protocol


@dataclass(frozen=True)
class Sampling:
    n: int = 8
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 4096
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" | "length" (| "abort" from a server; "error": see error)
    error: str | None = None  # set when a server request failed after its retries: not a trace
    max_tokens: int | None = None  # the budget it really had, when the engine had to shrink it to fit the context


@dataclass(frozen=True)
class Request:
    """One request of `Engine.stream`: `key` comes back with its completions."""
    key: Any
    prompt: Any  # a prompt string, or token ids (tokenize()'s output)
    sampling: Sampling


class Engine(Protocol):
    model_name: str
    max_model_len: int

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None) -> str: ...

    def tokenize(self, prompts: list[str]) -> list[list[int]]: ...

    def generate(self, prompts: list[str] | list[list[int]], sampling: list[Sampling], progress: bool = False) -> list[list[Completion]]: ...

    def stream(self, requests: Iterable[Request], window: int | None = None) -> Iterator[tuple[Any, list[Completion]]]:
        """Keep up to `window` sequences in flight, pulling requests from `requests` as earlier
        ones finish (across any boundary the caller has, e.g. shards); yield (key, completions)
        for each request as soon as all its samples are done, in completion order."""
        ...


@dataclass
class ServerConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    """The server's OpenAI-compatible root (ends in /v1)."""
    api: str = "completions"
    """completions (prompt rendered here with the chat template) | chat (server's template)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key; a local server takes any key."""
    tokenizer: str | None = None
    """Local tokenizer dir for the chat template and prompt lengths; unset: engine.model if it is a directory."""
    max_concurrency: int = 1024
    """Sequences in flight at once (a request of n samples counts n). Keep it at 2-4x the
    server's total sequence slots (vLLM's max_num_seqs x data-parallel ranks) so the server's
    queue never runs dry while finished answers travel back."""
    max_retries: int = 5
    """Retries of a request on 429 / 5xx / connection errors, with exponential backoff."""
    timeout_s: float = 3600.0
    """Per-request timeout (each try); a request may wait in the server's queue, then decode 32k tokens."""
    n_per_request: bool = False
    """false: one request per sample, seeded seed+i (vLLM gives sample i of an n-request that
    seed too, so the traces are the same), each freeing its slot when it ends and reporting its
    own token count; true: n samples in one request (fewer requests; the slowest sample holds
    all n, and token counts come from the local tokenizer)."""
    journal: str | None = None
    """Where finished samples are appended; unset: RUN/server_journal.jsonl."""
    extra_body: dict = field(default_factory=dict)
    """Extra request fields passed as they are (e.g. top_k, repetition_penalty)."""


@dataclass
class EngineConfig:
    backend: str = "vllm"
    """vllm: in-process offline engine | server: an OpenAI-compatible server (engine.server)."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The server backend's settings (unused by backend: vllm)."""
    model: str = ""
    """Local model directory (or hub name where the hub is reachable); with backend: server, the served model's name."""
    dtype: str = "auto"
    """Weights and activations dtype. auto: the checkpoint's on GPUs and on CPUs with native bf16
    (where vLLM runs float32 checkpoints as bfloat16); float32 on CPUs without it (resolve_dtype)."""
    max_model_len: int = 4096
    """Prompt + completion tokens per sequence; long-CoT teachers want 32768."""
    gpu_memory_utilization: float = 0.9
    """Share of GPU memory for weights + KV cache (on CPU, of the KV cache budget)."""
    cpu_kv_cache_space_gb: int | None = None
    """CPU only: KV cache size in whole GiB (sets VLLM_CPU_KVCACHE_SPACE); keeps tests small."""
    tensor_parallel_size: int = 1
    """GPUs per model replica."""
    enforce_eager: bool = False
    """Skip graph capture / compilation (faster start, slower decode)."""
    seed: int = 0
    """Engine seed; per-request seeds come from the rollout config."""
    extra: dict = field(default_factory=dict)
    """Other vllm.LLM keyword arguments, passed as they are."""


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(requested: str, cuda: bool, flags: set[str] | None = None) -> tuple[str, str]:
    """The dtype an in-process engine (or the trainer) should run in, and why.

    vLLM's CPU build runs float32 checkpoints in bfloat16 under dtype=auto. A CPU without
    native bf16 (no AVX512-BF16, no AMX) only emulates it: the demo teacher decoded 1,061
    tok/s in bf16 and 4,835 tok/s in float32 on an AVX2 EPYC. So on such a CPU "auto" means
    float32; a dtype the recipe sets is kept; GPUs and native-bf16 CPUs keep "auto".
    """
    if requested != "auto":
        return requested, "set by the recipe"
    if cuda:
        return "auto", "GPU: the checkpoint's dtype"
    flags = cpu_flags() if flags is None else flags
    native = sorted(f for f in NATIVE_BF16_FLAGS if f in flags)
    if native:
        return "auto", f"CPU with native bf16 ({', '.join(native)}): vLLM's default"
    return "float32", "CPU without native bf16 (no avx512_bf16 / amx_bf16): bf16 would be emulated"


def make_engine(config: EngineConfig, run_dir: str | os.PathLike = ".") -> Engine:
    """The engine a recipe asks for; a server's journal defaults to RUN/server_journal.jsonl."""
    if config.backend == "vllm":
        return VLLMEngine(config)
    if config.backend == "server":
        from factory.server import ServerEngine

        return ServerEngine(config.model, config.server, os.path.join(run_dir, "server_journal.jsonl"),
                            config.max_model_len)
    raise ValueError(f"engine.backend={config.backend!r}; use vllm or server")


def shutdown(llm) -> None:
    """Stop a vllm.LLM's engine processes (where the installed vLLM exposes a shutdown)."""
    engine = getattr(llm, "llm_engine", None)
    stop = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if stop:
        stop()


class VLLMEngine:
    """vLLM's offline engine. Starting one takes 25–50 s on a CPU: build it once and pass it on."""

    def __init__(self, config: EngineConfig):
        if not config.model:
            raise ValueError("engine.model is empty: set it in the recipe or with engine.model=PATH")
        if config.cpu_kv_cache_space_gb is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_space_gb)
        from vllm import LLM

        extra = dict(config.extra)
        import torch

        if not torch.cuda.is_available():
            # vllm-cpu 0.32: a seeded request whose prefill is split across steps crashes the
            # worker ("CPU Generator does not use offset"); every rollout request is seeded.
            extra.setdefault("enable_chunked_prefill", False)
        self.config = config
        self.model_name = config.model
        self.dtype, self.dtype_reason = resolve_dtype(config.dtype, torch.cuda.is_available())
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
                    r = next(it, None)
                    if r is None:
                        exhausted = True
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

    def close(self) -> None:
        """Shut down the engine's processes (a script that ends does this anyway)."""
        shutdown(self.llm)


class VLLMTokenClassifier:
    """vLLM's pooling runner for token-classification models (Qwen2.5-Math-PRM style PRMs):
    per-token class probabilities (`token_classify` applies the softmax). The PRM scorer's
    `backend: vllm` uses it; vLLM runs float32 checkpoints in bfloat16 on CPU, so its scores
    agree with transformers' float32 ones to about 1e-2."""

    def __init__(self, model: str, max_model_len: int | None = None, cpu_kv_cache_space_gb: int | None = 1,
                 gpu_memory_utilization: float = 0.3, extra: dict | None = None):
        import torch

        if cpu_kv_cache_space_gb is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_space_gb)
        from vllm import LLM

        extra = dict(extra or {})
        if not torch.cuda.is_available():
            extra.setdefault("enable_chunked_prefill", False)
        self.llm = LLM(model=model, runner="pooling", max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, **extra)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def token_probs(self, token_ids: list[list[int]]):
        """For each sequence, a [T, num_labels] float tensor of class probabilities."""
        outs = self.llm.encode([{"prompt_token_ids": ids} for ids in token_ids], pooling_task="token_classify",
                               use_tqdm=False)
        return [o.outputs.data.float().cpu() for o in outs]

    def close(self) -> None:
        shutdown(self.llm)
