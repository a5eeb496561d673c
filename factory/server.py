"""A teacher behind an OpenAI-compatible server (vLLM's or SGLang's `serve`, or a hosted API).

`ServerEngine` has the methods of `factory.engine.Engine`, so rollout and rewrite use it
unchanged (`engine.backend: server` in a recipe). It sends requests with the `openai` client
(async, `max_concurrency` at a time); the client retries 429, 5xx and dropped connections with
exponential backoff (`max_retries`) and gives up on a request after `timeout_s`.

Resume is per request: every finished sample is appended to a journal (JSONL, flushed and
fsynced) under a key of (prompt, sampling parameters with the seed, model, API, sample index).
A re-run reads the journal and sends only what is missing, so a killed job loses at most the
requests in flight. A request that still fails after its retries comes back as a `Completion`
with `error` set; the rollout stage records it in its rejected table (`request_failed`), never
as an empty trace. Failures are not journalled: the next run tries them again.

Two APIs:
- completions: the prompt is rendered locally with the model's chat template (`tokenizer`,
  by default the model name as a local directory), exactly as the in-process engine renders it;
- chat: the server applies its own template; reasoning returned apart from the answer
  (`reasoning_content`, or `reasoning` in newer vLLM) is put back as `<think>…</think>`.
`n` samples go in one request where the server supports it (`n_per_request`), otherwise as
n requests with seeds seed, seed+1, ...
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

from factory.engine import Completion, Sampling, ServerConfig


class PromptIds(list):
    """Token ids that remember their prompt text (what a server is sent)."""

    def __init__(self, ids, text: str):
        super().__init__(ids)
        self.text = text


def request_key(model: str, api: str, prompt: str, sampling: Sampling) -> str:
    blob = json.dumps({"model": model, "api": api, "prompt": prompt, "sampling": sampling.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Journal:
    """Finished samples, one JSON line each: {key, index, text, num_tokens, finish_reason}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done: dict[tuple[str, int], Completion] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: that request is re-sent
                    continue
                self.done[(r["key"], r["index"])] = Completion(r["text"], r["num_tokens"], r["finish_reason"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def add(self, key: str, results: dict[int, Completion]) -> None:
        lines = "".join(json.dumps({"key": key, "index": i, "text": c.text, "num_tokens": c.num_tokens,
                                    "finish_reason": c.finish_reason}) + "\n" for i, c in results.items())
        self._f.write(lines)
        self._f.flush()
        os.fsync(self._f.fileno())
        for i, c in results.items():
            self.done[(key, i)] = c

    def close(self) -> None:
        self._f.close()


class ServerEngine:
    """An OpenAI-compatible server as the factory's Engine."""

    def __init__(self, model: str, cfg: ServerConfig, journal: str | Path, max_model_len: int = 4096):
        if cfg.api not in ("completions", "chat"):
            raise ValueError(f"engine.server.api={cfg.api!r}; use completions or chat")
        self.model_name = model
        self.max_model_len = max_model_len
        self.cfg = cfg
        self.journal = Journal(cfg.journal or journal)
        tok_dir = cfg.tokenizer or (model if Path(model).is_dir() else None)
        self.tokenizer = None
        if tok_dir:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        elif cfg.api == "completions":
            raise ValueError("engine.server.api=completions renders prompts here: set engine.server.tokenizer "
                             "to a local tokenizer directory (or use api: chat)")
        self.sent = 0  # requests sent by this process (tests and logs)

    # -- Engine --------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None) -> str:
        if self.cfg.api == "chat":
            if chat_template:
                raise ValueError("rollout.chat_template has no effect with engine.server.api=chat (the server templates)")
            return json.dumps(messages, ensure_ascii=False)  # carried to generate() as the message list
        return self.tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def tokenize(self, prompts: list[str]) -> list[PromptIds]:
        if self.tokenizer is None:  # chat against a hosted API: lengths are the server's business
            return [PromptIds([], p) for p in prompts]
        if self.cfg.api == "chat":
            ids = [self.tokenizer.apply_chat_template(json.loads(p), add_generation_prompt=True, tokenize=True)
                   for p in prompts]
            ids = [i["input_ids"] if isinstance(i, dict) else i for i in ids]
        else:
            ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return [PromptIds(i, p) for i, p in zip(ids, prompts)]

    def generate(self, prompts, sampling: list[Sampling], progress: bool = False) -> list[list[Completion]]:
        texts = [p.text if isinstance(p, PromptIds) else p for p in prompts]
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("ServerEngine.generate takes prompt strings or tokenize()'s output")
        return asyncio.run(self._generate(texts, sampling, progress))

    def close(self) -> None:
        self.journal.close()

    # -- requests --------------------------------------------------------------------------

    async def _generate(self, texts: list[str], sampling: list[Sampling], progress: bool) -> list[list[Completion]]:
        import openai
        from tqdm.auto import tqdm

        client = openai.AsyncOpenAI(base_url=self.cfg.base_url, api_key=os.environ.get(self.cfg.api_key_env) or "EMPTY",
                                    max_retries=self.cfg.max_retries, timeout=self.cfg.timeout_s)
        gate = asyncio.Semaphore(self.cfg.max_concurrency)
        keys = [request_key(self.model_name, self.cfg.api, t, s) for t, s in zip(texts, sampling)]
        jobs = []  # (request index, sample indices it returns, n, seed)
        for r, (k, s) in enumerate(zip(keys, sampling)):
            missing = [i for i in range(s.n) if (k, i) not in self.journal.done]
            if not missing:
                continue
            if self.cfg.n_per_request:
                jobs.append((r, list(range(s.n)), s.n, s.seed))  # one seed for all n: re-sent whole
            else:
                jobs += [(r, [i], 1, None if s.seed is None else s.seed + i) for i in missing]
        failed: dict[tuple[int, int], str] = {}
        bar = tqdm(total=len(jobs), desc="requests", unit="req", disable=not progress)

        async def one(r: int, indices: list[int], n: int, seed: int | None) -> None:
            async with gate:
                self.sent += 1
                try:
                    outs = await self._request(client, texts[r], sampling[r], n, seed)
                except Exception as e:  # noqa: BLE001 - whatever the client raised after its retries
                    for i in indices:
                        failed[(r, i)] = f"{type(e).__name__}: {e}"[:500]
                else:
                    self.journal.add(keys[r], dict(zip(indices, outs)))
                bar.update(1)

        try:
            await asyncio.gather(*(one(*j) for j in jobs))
        finally:
            bar.close()
            await client.close()
        return [[self.journal.done.get((k, i)) or Completion("", 0, "error", error=failed.get((r, i), "not sent"))
                 for i in range(s.n)] for r, (k, s) in enumerate(zip(keys, sampling))]

    async def _request(self, client, text: str, s: Sampling, n: int, seed: int | None) -> list[Completion]:
        common = dict(model=self.model_name, n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                      seed=seed, stop=list(s.stop) or None, extra_body=self.cfg.extra_body or None)
        if self.cfg.api == "completions":
            resp = await client.completions.create(prompt=text, **common)
            texts = [(c.index, c.text, c.finish_reason) for c in resp.choices]
        else:
            resp = await client.chat.completions.create(messages=json.loads(text), **common)
            texts = []
            for c in resp.choices:
                extra = c.message.model_extra or {}
                reasoning = extra.get("reasoning_content") or extra.get("reasoning")
                body = c.message.content or ""
                texts.append((c.index, f"<think>\n{reasoning}\n</think>\n{body}" if reasoning else body, c.finish_reason))
        if len(texts) != n:
            raise RuntimeError(f"asked for {n} samples, the server returned {len(texts)}")
        texts.sort(key=lambda x: x[0])
        out = []
        for _, t, finish in texts:
            count = len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) if self.tokenizer else 0
            out.append(Completion(t, count, finish or "stop"))
        return out
