"""A teacher behind an OpenAI-compatible server (vLLM's or SGLang's `serve`, or a hosted API).

`ServerEngine` has the methods of `factory.engines.Engine`, so rollout and rewrite use it
unchanged (`engine.backend: server` in a recipe). It sends requests on one aiohttp session
(`HTTP` below: openai's retry policy for 408 / 409 / 429 / 5xx and dropped connections, with
exponential backoff, `max_retries`, and a timeout of `timeout_s` per try). A 200 counts only
when it is a whole answer: a body that is not JSON (cut short, an HTML error page), without
its choices, with fewer than were asked for, a choice without text, or without the `usage` a
per-sample request takes its token count from, is retried the same way. Retries and final
failures are counted per cause (`ServerEngine.retries`, `.failures`; a failed sample's
`error` starts with its cause), for the manifest and the progress file.

`stream` keeps `max_concurrency` sequences in flight for as long as the caller has requests:
each sample is its own request (seeded seed+i, as vLLM seeds sample i of an n-request), so a
finished sample frees its place at once instead of waiting for its slowest sibling, and its
token count is the server's `usage`. The rollout stage streams every shard through one call,
so the server's queue never drains at a shard boundary. `generate` is `stream` over one list.

When prompt + max_tokens exceed the server's context, the server answers 400; the request is
sent again with the budget that fits (as NeMo-Skills does), and the completion records it
(`Completion.max_tokens`). A request that still fails after its retries comes back as a
`Completion` with `error` set (the rollout stage rejects it as `request_failed`, never as an
empty trace); one failed request never ends the run.

`generate` (used by rewrite and the PRM labeller) journals every finished sample (JSONL,
flushed, fsynced) under a key of (prompt, sampling parameters with the seed, model, API,
sample index); a re-run sends only what is missing. The journal keeps only keys and file
offsets in memory. The rollout stage does not use it: it makes each problem durable itself.

Two APIs:
- completions: the prompt is rendered locally with the model's chat template (`tokenizer`,
  by default the model name as a local directory), exactly as the in-process engine renders it;
- chat: the server applies its own template; reasoning returned apart from the answer
  (`reasoning_content`, or `reasoning` in newer vLLM) is put back as `<think>…</think>`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from factory.engines.base import Completion, Request, Sampling, ServerConfig


_END = object()
T = TypeVar("T")


class PromptIds(list):
    """Token ids that remember their prompt text (what a server is sent)."""

    def __init__(self, ids, text: str):
        super().__init__(ids)
        self.text = text


def request_key(model: str, api: str, prompt: str, sampling: Sampling) -> str:
    blob = json.dumps({"model": model, "api": api, "prompt": prompt, "sampling": sampling.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Journal:
    """Finished samples, one JSON line each: {key, index, text, num_tokens, finish_reason}.
    In memory: (key, index) -> byte offset of its line; texts are read back when asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offsets: dict[tuple[str, int], int] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a+b")
        self._f.seek(0)
        pos = 0
        for line in self._f:
            try:
                r = json.loads(line)
                self.offsets[(r["key"], r["index"])] = pos
            except (json.JSONDecodeError, KeyError):  # a line cut short by a kill: that sample is re-sent
                pass
            pos += len(line)
        self._f.seek(0, os.SEEK_END)
        if pos and not line.endswith(b"\n"):  # start after the cut line, not inside it
            self._f.write(b"\n")

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.offsets

    def get(self, key: str, index: int) -> Completion | None:
        pos = self.offsets.get((key, index))
        if pos is None:
            return None
        with open(self.path, "rb") as f:
            f.seek(pos)
            r = json.loads(f.readline())
        return Completion(r["text"], r["num_tokens"], r["finish_reason"], max_tokens=r.get("max_tokens"))

    def add(self, key: str, results: dict[int, Completion]) -> None:
        self._f.seek(0, os.SEEK_END)
        pos = self._f.tell()
        for i, c in results.items():
            line = (json.dumps({"key": key, "index": i, "text": c.text, "num_tokens": c.num_tokens,
                                "finish_reason": c.finish_reason, "max_tokens": c.max_tokens}) + "\n").encode()
            self._f.write(line)
            self.offsets[(key, i)] = pos
            pos += len(line)
        self._f.flush()
        os.fsync(self._f.fileno())

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
        self.can_continue = cfg.api == "completions"  # a chat API cannot continue a cut trace
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
        # per cause: tries retried, and samples whose request failed for good (manifest, progress)
        self.retries: Counter = Counter()
        self.failures: Counter = Counter()

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
        """All samples of all prompts; samples already in the journal are not sent again."""
        texts = [p.text if isinstance(p, PromptIds) else p for p in prompts]
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("ServerEngine.generate takes prompt strings or tokenize()'s output")
        keys = [request_key(self.model_name, self.cfg.api, t, s) for t, s in zip(texts, sampling)]
        # a request with every sample journalled is not sent; one with some is sent whole
        # when n_per_request (one seed for all n), else only its missing samples go out
        todo = [Request(r, t, s) for r, (k, t, s) in enumerate(zip(keys, texts, sampling))
                if any((k, i) not in self.journal for i in range(s.n))]
        fresh: dict[int, list[Completion]] = {}
        for r, outs in self.stream(todo, skip=lambda r, i: (keys[r], i) in self.journal):
            fresh[r] = outs
            self.journal.add(keys[r], {i: c for i, c in enumerate(outs) if c is not None and c.error is None})
        out = []
        for r, (k, s) in enumerate(zip(keys, sampling)):
            got = fresh.get(r) or [None] * s.n  # None: journalled before this call
            out.append([got[i] or self.journal.get(k, i) or Completion("", 0, "error", error="not sent")
                        for i in range(s.n)])
        return out

    def close(self) -> None:
        self.journal.close()

    # -- requests --------------------------------------------------------------------------

    def stream(self, requests: Iterable[Request], window: int | None = None,
               skip: Callable[[object, int], bool] | None = None) -> Iterator[tuple[object, list[Completion]]]:
        """Engine.stream over HTTP: up to `window` (default max_concurrency) sequences in flight.
        `skip(key, i)`: sample i of that request is already had (its slot in the result is None)."""
        window = window or self.cfg.max_concurrency
        loop = asyncio.new_event_loop()
        client = loop.run_until_complete(self._client(window))
        # finished requests land in a queue: O(1) per completion (asyncio.wait over the whole
        # window would touch every task in flight each time one finishes)
        finished: asyncio.Queue = asyncio.Queue()
        it, tasks, open_requests = iter(requests), set(), {}
        in_flight, exhausted, counter = 0, False, itertools.count()

        async def send(*args) -> None:
            finished.put_nowait(await self._send(client, *args))

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
                    wanted = [i for i in range(s.n) if not (skip and skip(r.key, i))]
                    if self.cfg.n_per_request and wanted:
                        jobs = [(list(range(s.n)), s.n, s.seed)]  # one seed for all n: sent whole
                    else:
                        jobs = [([i], 1, None if s.seed is None else s.seed + i) for i in wanted]
                    if not jobs:
                        yield r.key, [None] * s.n
                        continue
                    open_requests[rid] = [r.key, [None] * s.n, sum(len(j[0]) for j in jobs)]
                    for indices, n, seed in jobs:
                        task = loop.create_task(send(rid, indices, text, s, n, seed))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        in_flight += len(indices)
                if not open_requests:
                    return
                for rid, indices, outs in loop.run_until_complete(next_finished()):
                    in_flight -= len(indices)
                    entry = open_requests[rid]
                    for i, c in zip(indices, outs):
                        entry[1][i] = c
                    entry[2] -= len(indices)
                    if entry[2] == 0:
                        del open_requests[rid]
                        yield entry[0], entry[1]
        finally:
            for t in list(tasks):
                t.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(client.close())
            loop.close()

    async def _client(self, window: int) -> "HTTP":
        return HTTP(self.cfg.base_url, os.environ.get(self.cfg.api_key_env) or "EMPTY", window + 16,
                    self.cfg.timeout_s, self.cfg.max_retries, self.retries)

    async def _send(self, client: "HTTP", rid: int, indices: list[int], text: str, s: Sampling, n: int, seed: int | None):
        """One HTTP request for samples `indices`; never raises (a failure becomes error completions,
        their `error` starting with the cause, e.g. "http_500: ...")."""
        self.sent += 1
        budget = s.max_tokens
        for _ in range(2):
            try:
                outs = await self._request(client, text, s, n, seed, budget)
                if budget != s.max_tokens:
                    outs = [dataclasses.replace(c, max_tokens=budget) for c in outs]
                return rid, indices, outs
            except RequestError as e:
                fit = fitting_budget(str(e), budget) if e.status == 400 else None
                if fit is None:
                    error = f"{e.cause}: {e}"
                    break
                budget = fit  # the server's context is shorter than prompt + max_tokens: ask for what fits
            except Exception as e:  # noqa: BLE001 - a bug here must not end the run: recorded, never raised
                error = f"client_error: {type(e).__name__}: {e}"
                break
        self.failures[error.split(":", 1)[0]] += len(indices)
        return rid, indices, [Completion("", 0, "error", error=error[:500]) for _ in indices]

    async def _request(self, client, text: str, s: Sampling, n: int, seed: int | None, max_tokens: int) -> list[Completion]:
        body = {"model": self.model_name, "n": n, "temperature": s.temperature, "top_p": s.top_p,
                "max_tokens": max_tokens, **({"seed": seed} if seed is not None else {}),
                **({"stop": list(s.stop)} if s.stop else {}), **self.cfg.extra_body}
        if self.cfg.api == "completions":
            return await client.post("/completions", {**body, "prompt": text}, lambda r: self._completions(r, n))
        return await client.post("/chat/completions", {**body, "messages": json.loads(text)},
                                 lambda r: self._completions(r, n))

    def _completions(self, resp, n: int) -> list[Completion]:
        """A 200's body as n completions, or BadResponse (retried like a 5xx) when it is not a whole
        answer: no choices or fewer than asked for, a choice without text, no usage where the
        token count comes from it. A body that counted as an answer is exactly a fault-free one."""
        if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list):
            raise BadResponse("no_choices", f"a 200 without a choices list: {str(resp)[:200]}")
        texts = []
        for c in resp["choices"]:
            if not isinstance(c, dict) or not isinstance(c.get("index"), int):
                raise BadResponse("bad_choice", f"a choice without an index: {str(c)[:200]}")
            if self.cfg.api == "completions":
                text = c.get("text")
            else:
                msg = c.get("message") or {}
                reasoning = msg.get("reasoning_content") or msg.get("reasoning")
                answer = msg.get("content")
                text = (f"<think>\n{reasoning}\n</think>\n{answer or ''}" if reasoning
                        else answer if isinstance(answer, str) else None)
            if not isinstance(text, str):
                raise BadResponse("no_text", f"choice {c['index']} has no text")
            texts.append((c["index"], text, c.get("finish_reason")))
        if sorted(i for i, _, _ in texts) != list(range(n)):
            raise BadResponse("too_few_choices", f"asked for {n} samples, the server returned {len(texts)}")
        texts.sort(key=lambda x: x[0])
        usage = resp.get("usage") or {}
        if n == 1:  # a per-sample request's count is the server's usage: without it the answer is incomplete
            k = usage.get("completion_tokens")
            if not isinstance(k, int):
                raise BadResponse("no_usage", "a 200 without usage.completion_tokens (the token count comes from it)")
            counts = [k]  # the server's own count: no re-tokenizing here
        elif self.tokenizer is not None:  # n samples share one usage total
            counts = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t, _ in texts]
        else:
            counts = [0] * n
        return [Completion(t, k, finish or "stop") for (_, t, finish), k in zip(texts, counts)]


def fitting_budget(message: str, max_tokens: int) -> int | None:
    """From a server's "maximum context length is C tokens ... (P in the messages, M in the
    completion)" 400 error, the largest max_tokens that fits (None: not that error, or nothing fits)."""
    ctx = re.search(r"maximum context length is (\d+)", message)
    prompt = re.search(r"(\d+) in the messages", message) or re.search(r"(\d+) (?:input|prompt) tokens", message)
    if not ctx or not prompt:
        return None
    fit = int(ctx.group(1)) - int(prompt.group(1))
    return fit if 0 < fit < max_tokens else None


class RequestError(Exception):
    """A request that failed for good: after the retries, or at once for a status not worth retrying.
    `cause` names the last try's failure: http_<status>, connection, timeout, bad_json, html, or
    a BadResponse's cause."""

    def __init__(self, message: str, status: int | None = None, cause: str = "unknown"):
        super().__init__(message)
        self.status, self.cause = status, cause


class BadResponse(Exception):
    """A 200 that is not a whole answer: retried with the same backoff as a 5xx."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


class HTTP:
    """JSON POSTs to an OpenAI-compatible server on one aiohttp session, with openai's retry policy:
    408, 409, 429, 5xx and connection errors or timeouts are retried `max_retries` times with
    exponential backoff (0.5 s doubling to 8 s, jittered), honouring a short Retry-After.

    Written here rather than using the openai client: its per-request plumbing (httpx models,
    URL parsing, request transforms) cost ~2 ms of driver CPU per request even on its aiohttp
    transport, 2.6 ms per 16 KB trace in all, and httpx's own pool 27 ms at ~1,000 requests in
    flight (NOTES.md); this costs a fraction of a millisecond, so one driver core keeps up with
    hundreds of traces per second.
    """

    RETRY_STATUS = {408, 409, 429}

    def __init__(self, base_url: str, api_key: str, max_connections: int, timeout_s: float, max_retries: int,
                 retries: Counter | None = None):
        import aiohttp

        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_connections),
                                             timeout=aiohttp.ClientTimeout(total=timeout_s))
        self.max_retries = max_retries
        self.retries = Counter() if retries is None else retries  # cause -> tries that were retried

    async def post(self, path: str, body: dict, check: Callable[[object], T]) -> T:
        """POST `body`; `check` turns a 200's parsed JSON into the result or raises BadResponse.
        A 200 counts only once its body parses and passes `check`: a body cut short, an HTML
        error page, or an answer without its choices is retried like a 5xx."""
        import aiohttp

        data = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                async with self.session.post(self.base + path, data=data, headers=self.headers) as r:
                    raw = await r.read()
                    status = r.status
                    if status == 200:
                        try:
                            return check(json.loads(raw))
                        except json.JSONDecodeError as e:
                            html = raw.lstrip()[:1].startswith(b"<") or "html" in r.headers.get("Content-Type", "")
                            cause = "html" if html else "bad_json"
                            message = f"a 200 whose body is not JSON ({e}; {len(raw)} bytes): {raw[:200].decode(errors='replace')}"
                        except BadResponse as e:
                            cause, message = e.cause, str(e)
                    else:
                        message = f"HTTP {status}: {raw[:400].decode(errors='replace')}"
                        cause = f"http_{status}"
                        if status not in self.RETRY_STATUS and status < 500:
                            raise RequestError(message, status, cause)
                        wait = retry_after(r.headers.get("Retry-After"))
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                message, status, cause = f"{type(e).__name__}: {e}", None, "connection"
            except asyncio.TimeoutError as e:
                message, status, cause = f"no answer within {self.session.timeout.total:g} s ({type(e).__name__})", None, "timeout"
            if attempt == self.max_retries:
                raise RequestError(f"{message} (after {self.max_retries} retries)", status, cause)
            self.retries[cause] += 1
            await asyncio.sleep(wait if wait is not None else min(8.0, 0.5 * 2**attempt) * (0.75 + 0.25 * random.random()))
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.session.close()


def retry_after(header: str | None) -> float | None:
    """A Retry-After of a few seconds is honoured; dates and long waits fall back to backoff."""
    try:
        v = float(header) if header is not None else None
    except ValueError:
        return None
    return v if v is not None and 0 <= v <= 60 else None
