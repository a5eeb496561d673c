"""What a stage is handed to generate with: the `Engine` interface, its request and result
types, and the engine configs. Implementations: `inprocess.VLLMEngine` (vLLM in this process,
the only module that imports vllm) and `server.ServerEngine` (an OpenAI-compatible server);
`make_engine` (the package) picks one from a recipe.

    engine = make_engine(EngineConfig(model="path/to/model"))
    outs = engine.generate(prompts, [Sampling(n=8, temperature=0.6, top_p=0.95, max_tokens=4096, seed=1)])
    for key, completions in engine.stream(requests):   # a window of sequences kept in flight
        ...
"""

from __future__ import annotations

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
    forced_answer: bool = False  # closed at the thinking budget and continued (rollout.max_think_tokens)

    def as_tuple(self) -> tuple:
        """The fields in order (`Completion(*t)` rebuilds it): how a completion crosses Ray and
        is kept in a rollout's partial file. Not `dataclasses.astuple`, which deep-copies."""
        return self.text, self.num_tokens, self.finish_reason, self.error, self.max_tokens, self.forced_answer


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
        for each request as soon as all its samples are done, in completion order. The source
        may yield None: nothing to send until a request in flight finishes (its consumer may
        then have follow-up requests, e.g. the thinking budget's second phase)."""
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
class SimConfig:
    """The simulated teacher of `factory.engines.simserver` run in this process (`backend: sim`),
    for fleet benchmarks and tests: on `executor: ray` each engine replica holds its own."""
    slots: int = 256
    """Sequences decoded at once (vLLM's max_num_seqs)."""
    rate: float = 2000.0
    """Tokens per second per slot."""
    median: float = 3000.0
    """Median trace length in tokens (lognormal)."""
    sigma: float = 0.8
    """Lognormal sigma of trace lengths."""
    tokenizer: str | None = None
    """Local tokenizer dir for the chat template and prompt lengths; unset: engine.model as a directory."""


@dataclass
class PriceConfig:
    """What the teacher's tokens cost, for the estimate in a run's summary and dataset card."""
    prompt_per_million: float = 0.0
    """Price of a million prompt tokens (every sample's request counts its prompt)."""
    completion_per_million: float = 0.0
    """Price of a million generated tokens."""
    currency: str = "USD"


@dataclass
class EngineConfig:
    backend: str = "vllm"
    """vllm: in-process offline engine | server: an OpenAI-compatible server (engine.server) |
    sim: the simulated teacher in this process (engine.sim; benchmarks and tests)."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The server backend's settings (unused by backend: vllm)."""
    sim: SimConfig = field(default_factory=SimConfig)
    """The simulated teacher's settings (backend: sim only)."""
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
    engine_process: bool | None = None
    """Run vLLM's engine core and worker in processes of their own (vLLM's default). None: yes on
    a GPU, where that overlaps scheduling with the GPU's work; no on a CPU, where both would only
    take turns with the driver on the same cores (on a 2-core EPYC: start 38 s instead of 56 s,
    7,081 instead of 6,150 tok/s)."""
    seed: int = 0
    """Engine seed; per-request seeds come from the rollout config."""
    extra: dict = field(default_factory=dict)
    """Other vllm.LLM keyword arguments, passed as they are."""
    price: PriceConfig | None = None
    """Token prices (e.g. a hosted teacher's, or a GPU-hour converted); unset: no cost estimate."""


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


CPU_BF16_ENV = "FACTORY_CPU_BF16"
"""Tests only: `native` or `emulated` makes resolve_dtype act as on a CPU with / without native
bf16, whatever this one has, so one machine runs the suite both ways (`make test-dtype-flip`)."""


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where it cannot be read). FACTORY_CPU_BF16
    adds (native) or removes (emulated) the native-bf16 flags."""
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced not in ("", "native", "emulated"):
        raise ValueError(f"{CPU_BF16_ENV}={forced!r}; use native, emulated or leave it unset")
    flags = _proc_flags()
    if forced == "native":
        return flags | {"avx512_bf16"}
    if forced == "emulated":
        return flags - set(NATIVE_BF16_FLAGS)
    return flags


def _proc_flags() -> set[str]:
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
