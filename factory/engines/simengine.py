"""The simulated teacher of `simserver` as an in-process Engine (`engine.backend: sim`).

    engine = make_engine(EngineConfig(backend="sim", model="sim", sim=SimConfig(slots=32, tokenizer=DIR)))

For fleet benchmarks and tests: on `executor: ray` every engine replica actor holds one of
these, with its own slots and decode rate, so R simulated replicas are measured the way
`benchmarks/fleet.py` measures one simulated server. It gives the traces that `simserver`
gives the server backend in its default per-sample mode (sample i of a request seeded s is
the sequence seeded s+i; the token count is the sequence's own), and it shrinks a budget that
overflows the context as the server client does after the server's 400, so a run on either
has the same products.

`stats()` is the teacher's (busy slot-seconds, sequences, tokens) with `first` / `last`, the
wall-clock times of the first request and the last answer, so the windows of replicas in
different processes can be put together.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from factory.engines.base import Completion, Request, Sampling, SimConfig
from factory.engines.server import PromptIds
from factory.engines.simserver import Teacher

_END = object()


class SimEngine:
    """`simserver.Teacher` behind the Engine interface, on an event loop of its own."""

    can_continue = True  # a completions-style prompt: a cut trace can be continued from its text

    def __init__(self, model: str, cfg: SimConfig, max_model_len: int = 40960):
        self.tok_dir = cfg.tokenizer or (model if Path(model).is_dir() else None)
        if self.tok_dir is None:
            raise ValueError("engine.backend=sim renders prompts here: set engine.sim.tokenizer to a local tokenizer directory")
        self._tokenizer = None
        self.model_name, self.max_model_len, self.cfg = model, max_model_len, cfg
        self.teacher = Teacher(cfg.slots, cfg.rate, cfg.median, cfg.sigma, max_model_len)
        # the teacher's semaphore binds to the first loop that waits on it: one loop for the engine's life
        self.loop = asyncio.new_event_loop()
        # one sequence per slot keeps every slot busy: a sample's end frees its slot and the next
        # request is taken at once (the in-process source needs no slack for a network round trip)
        self.default_window = cfg.slots

    @property
    def tokenizer(self):
        # loaded on first use: a replica on Ray is sent prompts already rendered and never needs it
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tok_dir)
        return self._tokenizer

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def tokenize(self, prompts: list[str]) -> list[PromptIds]:
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return [PromptIds(i, p) for i, p in zip(ids, prompts)]

    def generate(self, prompts, sampling: list[Sampling], progress: bool = False) -> list[list[Completion]]:
        out: dict[int, list[Completion]] = {}
        for i, outs in self.stream([Request(i, p, s) for i, (p, s) in enumerate(zip(prompts, sampling))]):
            out[i] = outs
        return [out[i] for i in range(len(prompts))]

    def stream(self, requests: Iterable[Request], window: int | None = None) -> Iterator[tuple[Any, list[Completion]]]:
        """Engine.stream: up to `window` sequences (default: the slots) in flight, one task each."""
        window = window or self.default_window
        loop, teacher = self.loop, self.teacher
        finished: asyncio.Queue = asyncio.Queue()
        it, tasks, open_requests = iter(requests), set(), {}
        in_flight, exhausted, counter = 0, False, itertools.count()

        async def one(rid: int, i: int, prompt: str, seed: int, max_tokens: int) -> None:
            finished.put_nowait((rid, i, await self._sequence(prompt, seed, max_tokens)))

        async def next_finished() -> list:
            out = [await finished.get()]
            while not finished.empty():
                out.append(finished.get_nowait())
            return out

        try:
            while True:
                while not exhausted and in_flight < window:
                    r = next(it, _END)
                    if r is _END:
                        exhausted = True
                        break
                    if r is None:  # the source has nothing to send until something finishes
                        if not open_requests:
                            raise RuntimeError("stream: the request source is waiting with nothing in flight")
                        break
                    text = r.prompt.text if isinstance(r.prompt, PromptIds) else r.prompt
                    s, rid = r.sampling, next(counter)
                    seed = s.seed if s.seed is not None else random.getrandbits(31)
                    teacher.first = time.time() if teacher.first is None else teacher.first
                    teacher.requests += s.n
                    open_requests[rid] = [r.key, [None] * s.n, s.n]
                    for i in range(s.n):
                        task = loop.create_task(one(rid, i, text, seed + i, s.max_tokens))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    in_flight += s.n
                if not open_requests:
                    return
                for rid, i, c in loop.run_until_complete(next_finished()):
                    in_flight -= 1
                    entry = open_requests[rid]
                    entry[1][i] = c
                    entry[2] -= 1
                    if entry[2] == 0:
                        del open_requests[rid]
                        teacher.last = time.time()
                        yield entry[0], entry[1]
        finally:
            for t in list(tasks):
                t.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))

    async def _sequence(self, prompt: str, seed: int, max_tokens: int) -> Completion:
        # what the server answers and its client makes of it: a budget past the context is shrunk to fit
        prompt_tokens = max(1, len(prompt) // 4)
        budget = max_tokens
        if prompt_tokens + max_tokens > self.max_model_len:
            budget = self.max_model_len - prompt_tokens
            if budget <= 0:
                return Completion("", 0, "error", error=f"HTTP 400: prompt of {prompt_tokens} tokens exceeds the "
                                                        f"maximum context length of {self.max_model_len} tokens")
        text, tokens, finish = await self.teacher.run_sequence(prompt, seed, budget)
        return Completion(text, tokens, finish, max_tokens=budget if budget != max_tokens else None)

    def stats(self) -> dict:
        """The teacher's counts, with the wall-clock times of its first request and last answer."""
        return {**self.teacher.stats(), "first": self.teacher.first, "last": self.teacher.last, "rate": self.cfg.rate}

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.close()
