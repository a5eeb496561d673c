"""A simulated reasoning teacher behind an OpenAI-compatible completions API, on loopback.

    python -m factory.engines.simserver --port 8765 --slots 256 --rate 2000 --median 3000 --sigma 0.8

It behaves like a GPU running vLLM for what decides a batch job's throughput, and nothing
else: a fixed number of sequence slots (vLLM's max_num_seqs), a constant decode rate per
slot, and R1-like trace lengths (lognormal with the given median and sigma, capped by the
request's max_tokens). A request with n samples becomes n sequences that each wait for a
free slot, hold it for length / rate seconds, and release it; the HTTP answer comes when all
n are done, as vLLM's does. Sequence i of a request seeded s is the sequence of a request
with n=1 seeded s+i (vLLM's parallel sampling gives child i the seed s+i), so both ways of
asking give the same traces.

Texts are R1-shaped: `<think>` with ~4 bytes per token of varied words, `</think>`, and a
boxed answer that is right with a per-problem probability (the problem's "a + b" is read
from the prompt). A trace capped by max_tokens stops inside its reasoning (finish "length").
Requests whose prompt + max_tokens exceed --max-model-len get vLLM's 400 error.

GET /sim/stats gives busy slot-seconds and the window from the first request to the last
answer, so a client can compute utilization = busy / (slots x window); POST /sim/reset
clears them. Everything is deterministic in (prompt, seed), so two runs give equal products.

It can misbehave as servers do over a job of days (`Faults`; --faults, --fault-tries,
--fail-share, --stall-s, or POST /sim/faults with the same fields as JSON at any time):
    500 / 429   an error status (429 with Retry-After: 0)
    drop        the connection closed before any reply
    cut         a 200 whose JSON body is cut in half
    html        a 200 whose body is a proxy's HTML error page
    empty       a 200 with `choices: []`
    notext      a 200 whose choices have no text
    nousage     a 200 without `usage`
    stall       no answer for --stall-s seconds (longer than the client's timeout), then a good one
Every distinct request (prompt, seed, n, max_tokens) fails its first `first_tries` tries, one
fault per try, the classes taken in turn from a per-request offset; a `fail_share` of distinct
requests always fails (HTTP 500). Which request gets which fault depends only on the request
and its try number, so a test's faults are exact. GET /sim/stats counts the faults injected.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field

WORDS = ("so the running total is then we add carry the digit check again subtract multiply wait "
         "let me verify this step first note that since therefore hence which gives us value").split()


def _unit(*parts) -> float:
    """A deterministic number in [0, 1) from the parts."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def _truth(prompt: str) -> int:
    """The sum the prompt's last "a + b" asks for (0 when it asks none)."""
    m = re.findall(r"(\d+) \+ (\d+)", prompt)
    return int(m[-1][0]) + int(m[-1][1]) if m else 0


class Teacher:
    def __init__(self, slots: int, rate: float, median: float, sigma: float, max_model_len: int,
                 corpus_bytes: int = 1 << 20):
        self.slots, self.rate, self.median, self.sigma = slots, rate, median, sigma
        self.max_model_len = max_model_len
        rng = random.Random(0)
        text = " ".join(rng.choice(WORDS) for _ in range(corpus_bytes // 5))
        self.corpus = text + text  # a slice at any offset < len(text) has len(text) chars
        self.half = len(text)
        self.reset()

    def reset(self) -> None:
        self.gate = asyncio.Semaphore(self.slots)
        self.busy = 0.0
        self.active = self.peak = 0
        self.first = self.last = None
        self.sequences = self.requests = self.tokens = 0

    def sequence(self, prompt: str, seed: int, max_tokens: int) -> tuple[str, int, str]:
        """(text, tokens, finish_reason) of the sequence seeded `seed` for `prompt`."""
        if prompt.rstrip().endswith("</think>"):  # a trace closed at a thinking budget: answer at once
            question = prompt[:prompt.find("<think>")] if "<think>" in prompt else prompt
            truth = _truth(question)
            right = _unit(question, seed, "forced") < _unit(question, "p") / 2  # guessing: half as often right
            text = f"The answer is $\\boxed{{{truth if right else truth + 1}}}$."
            tokens = max(1, len(text) // 4)
            return (text, tokens, "stop") if tokens <= max_tokens else (text[:4 * max_tokens], max_tokens, "length")
        u1, u2 = _unit(prompt, seed, "a"), _unit(prompt, seed, "b")
        z = math.sqrt(-2 * math.log(1 - u1)) * math.cos(2 * math.pi * u2)  # Box-Muller
        want = max(16, int(self.median * math.exp(self.sigma * z)))
        tokens = min(want, max_tokens)
        offset = int(_unit(prompt, seed, "offset") * self.half)
        if want > max_tokens:  # cut inside the reasoning
            return "<think>\n" + self.corpus[offset: offset + max(0, 4 * tokens - 8)], tokens, "length"
        truth = _truth(prompt)
        right = _unit(prompt, seed, "right") < _unit(prompt, "p")  # per-problem pass rate
        tail = f"\n</think>\n\nThe answer is $\\boxed{{{truth if right else truth + 1}}}$."
        body = self.corpus[offset: offset + max(0, 4 * tokens - 8 - len(tail))]
        return "<think>\n" + body + tail, tokens, "stop"

    async def run_sequence(self, prompt: str, seed: int, max_tokens: int) -> tuple[str, int, str]:
        text, tokens, finish = self.sequence(prompt, seed, max_tokens)
        async with self.gate:
            self.active += 1
            self.peak = max(self.peak, self.active)
            t0 = time.monotonic()
            await asyncio.sleep(tokens / self.rate)
            self.busy += time.monotonic() - t0
            self.active -= 1
        self.sequences += 1
        self.tokens += tokens
        return text, tokens, finish

    def stats(self) -> dict:
        window = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
        return {"slots": self.slots, "busy_slot_seconds": self.busy, "window_seconds": window,
                "utilization": self.busy / (self.slots * window) if window else 0.0, "peak_active": self.peak,
                "sequences": self.sequences, "requests": self.requests, "tokens": self.tokens}


FAULTS = ("500", "429", "drop", "cut", "html", "empty", "notext", "nousage", "stall")
HTML_PAGE = ("<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1>"
             "</center><hr><center>nginx</center></body></html>")


@dataclass
class Faults:
    classes: list[str] = field(default_factory=list)
    """Faults (FAULTS) a request meets on its first `first_tries` tries, one per try, in turn."""
    first_tries: int = 0
    """Tries of every distinct request that fail before it is answered."""
    fail_share: float = 0.0
    """Share of distinct requests that always fail (HTTP 500), chosen by a hash of the request."""
    stall_s: float = 30.0
    """How long a `stall` keeps the client waiting before it answers."""

    def __post_init__(self):
        unknown = [c for c in self.classes if c not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault classes {unknown}; choose from {', '.join(FAULTS)}")
        if self.first_tries and not self.classes:
            raise ValueError("first_tries needs fault classes")

    def pick(self, key: str, attempt: int) -> str | None:
        """The fault of try `attempt` (0-based) of the request `key`, or None: answer it."""
        if self.fail_share and _unit(key, "always-fails") < self.fail_share:
            return "500"
        if attempt < self.first_tries:
            start = int(_unit(key, "fault-offset") * len(self.classes))
            return self.classes[(start + attempt) % len(self.classes)]
        return None


def make_app(teacher: Teacher, faults: Faults | None = None):
    from aiohttp import web

    state = {"faults": faults or Faults(), "tries": {}, "injected": {}}

    def answer(payload: dict, fault: str | None) -> web.Response:
        """The answer as the fault shapes it (only 200 faults reach here)."""
        if fault == "empty":
            payload = {**payload, "choices": []}
        elif fault == "notext":
            payload = {**payload, "choices": [{k: v for k, v in c.items() if k != "text"} for c in payload["choices"]]}
        elif fault == "nousage":
            payload = {k: v for k, v in payload.items() if k != "usage"}
        elif fault == "cut":
            raw = json.dumps(payload)
            return web.Response(text=raw[: len(raw) // 2], content_type="application/json")
        elif fault == "html":
            return web.Response(text=HTML_PAGE, content_type="text/html")
        return web.json_response(payload)

    async def completions(request: web.Request) -> web.Response:
        now = time.monotonic()
        teacher.first = now if teacher.first is None else teacher.first
        teacher.requests += 1
        body = await request.json()
        prompt, n = body["prompt"], int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or 16)
        key = hashlib.blake2b(repr((prompt, body.get("seed"), n, max_tokens)).encode(), digest_size=12).hexdigest()
        attempt = state["tries"][key] = state["tries"].get(key, -1) + 1
        fault = state["faults"].pick(key, attempt)
        if fault is not None:
            state["injected"][fault] = state["injected"].get(fault, 0) + 1
        if fault in ("500", "429"):
            return web.json_response({"error": {"message": f"injected {fault}", "type": "server_error"}},
                                     status=int(fault), headers={"Retry-After": "0"} if fault == "429" else None)
        if fault == "drop":
            request.transport.close()  # the client sees the connection closed before any reply
            raise asyncio.CancelledError
        if fault == "stall":
            await asyncio.sleep(state["faults"].stall_s)
        prompt_tokens = max(1, len(prompt) // 4)
        if prompt_tokens + max_tokens > teacher.max_model_len:
            msg = (f"This model's maximum context length is {teacher.max_model_len} tokens. However, you requested "
                   f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                   f"completion). Please reduce the length of the messages or completion.")
            return web.json_response({"error": {"message": msg, "type": "BadRequestError", "code": 400}}, status=400)
        seed = body.get("seed")
        seed = int(seed) if seed is not None else random.getrandbits(31)
        outs = await asyncio.gather(*(teacher.run_sequence(prompt, seed + i, max_tokens) for i in range(n)))
        teacher.last = time.monotonic()
        return answer({
            "id": f"cmpl-{teacher.requests}", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model", "sim"),
            "choices": [{"index": i, "text": t, "finish_reason": f, "logprobs": None} for i, (t, _, f) in enumerate(outs)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(k for _, k, _ in outs),
                      "total_tokens": prompt_tokens + sum(k for _, k, _ in outs)},
        }, fault if fault != "stall" else None)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({**teacher.stats(), "faults": asdict(state["faults"]),
                                  "faults_injected": dict(state["injected"])})

    async def set_faults(request: web.Request) -> web.Response:
        try:
            state["faults"] = Faults(**await request.json())
        except (TypeError, ValueError) as e:
            return web.json_response({"error": {"message": str(e)}}, status=400)
        state["tries"], state["injected"] = {}, {}
        return web.json_response(asdict(state["faults"]))

    async def reset(request: web.Request) -> web.Response:
        teacher.reset()
        return web.json_response({"ok": True})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "sim", "object": "model"}]})

    app = web.Application(client_max_size=64 << 20)
    app.add_routes([web.post("/v1/completions", completions), web.get("/sim/stats", stats),
                    web.post("/sim/reset", reset), web.get("/v1/models", models),
                    web.post("/sim/faults", set_faults)])
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--slots", type=int, default=256, help="sequences decoded at once (vLLM's max_num_seqs)")
    p.add_argument("--rate", type=float, default=2000.0, help="tokens per second per slot")
    p.add_argument("--median", type=float, default=3000.0, help="median trace length in tokens")
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of trace lengths")
    p.add_argument("--max-model-len", type=int, default=40960)
    p.add_argument("--faults", default="", help=f"comma-separated fault classes ({', '.join(FAULTS)})")
    p.add_argument("--fault-tries", type=int, default=0, help="tries of every request that fail, one fault each")
    p.add_argument("--fail-share", type=float, default=0.0, help="share of requests that always fail (HTTP 500)")
    p.add_argument("--stall-s", type=float, default=30.0, help="how long a stall lasts")
    a = p.parse_args(argv)
    faults = Faults([c for c in a.faults.split(",") if c], a.fault_tries, a.fail_share, a.stall_s)
    from aiohttp import web

    async def serve():
        teacher = Teacher(a.slots, a.rate, a.median, a.sigma, a.max_model_len)
        runner = web.AppRunner(make_app(teacher, faults), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, a.host, a.port, backlog=4096).start()
        print(f"simulated teacher on http://{a.host}:{a.port}/v1 ({a.slots} slots x {a.rate:g} tok/s)", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
