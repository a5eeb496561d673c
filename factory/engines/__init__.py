"""Engines: what a stage generates with (`base`), vLLM in-process (`inprocess`), an OpenAI-compatible
server (`server`), a simulated teacher server for fleet benchmarks (`simserver`) and the same teacher
in this process (`simengine`), and one engine spread over replica actors on Ray (`fleet`)."""

from __future__ import annotations

import os

from factory.engines.base import (Completion, Engine, EngineConfig, Request, Sampling, ServerConfig, SimConfig,
                                  cpu_flags, resolve_dtype)

__all__ = ["Completion", "Engine", "EngineConfig", "Request", "Sampling", "ServerConfig", "SimConfig", "cpu_flags",
           "make_engine", "resolve_dtype"]


def make_engine(config: EngineConfig, run_dir: str | os.PathLike = ".") -> Engine:
    """The engine a recipe asks for; a server's journal defaults to RUN/server_journal.jsonl."""
    if config.backend == "vllm":
        from factory.engines.inprocess import VLLMEngine

        return VLLMEngine(config)
    if config.backend == "server":
        from factory.engines.server import ServerEngine

        return ServerEngine(config.model, config.server, os.path.join(run_dir, "server_journal.jsonl"),
                            config.max_model_len)
    if config.backend == "sim":
        from factory.engines.simengine import SimEngine

        return SimEngine(config.model, config.sim, config.max_model_len)
    raise ValueError(f"engine.backend={config.backend!r}; use vllm, server or sim")
