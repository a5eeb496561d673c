"""Engines: what a stage generates with (`base`), vLLM in-process (`inprocess`), an OpenAI-compatible
server (`server`), and a simulated teacher server for fleet benchmarks (`simserver`)."""

from __future__ import annotations

import os

from factory.engines.base import (Completion, Engine, EngineConfig, Request, Sampling, ServerConfig, cpu_flags,
                                  resolve_dtype)

__all__ = ["Completion", "Engine", "EngineConfig", "Request", "Sampling", "ServerConfig", "cpu_flags", "make_engine",
           "resolve_dtype"]


def make_engine(config: EngineConfig, run_dir: str | os.PathLike = ".") -> Engine:
    """The engine a recipe asks for; a server's journal defaults to RUN/server_journal.jsonl."""
    if config.backend == "vllm":
        from factory.engines.inprocess import VLLMEngine

        return VLLMEngine(config)
    if config.backend == "server":
        from factory.engines.server import ServerEngine

        return ServerEngine(config.model, config.server, os.path.join(run_dir, "server_journal.jsonl"),
                            config.max_model_len)
    raise ValueError(f"engine.backend={config.backend!r}; use vllm or server")
