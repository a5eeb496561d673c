"""One Engine over R replica actors on Ray: `stream` keeps every replica's engine saturated.

    fleet = EngineFleet.of(config, run_dir, replicas=8, actor_options={"num_gpus": 1})
    for key, completions in fleet.stream(requests):   # the rollout stage's continuous stream
        ...

Each replica is a Ray actor holding its own engine (`make_engine(config)` inside the actor:
vLLM in the actor's process, or the simulated teacher) and running that engine's own
`stream` in a thread, so each replica keeps its engine's window of sequences in flight as the
local executor's engine does. The stream's source is the replica's inbox: the engine takes
the next request the moment it has room, across any shard boundary.

The driver sends each replica what its engine's window can take at once (a replica holds at
least its window, counted in sequences as the engines count it: a request of n samples is n;
an idle replica starts full, not a few requests per reply), and beyond that
keeps its inbox short: `prefetch` requests, or about half a second of what that replica's
engine takes, whichever is more. A replica's replies (a
long-poll, `Replica.poll`) carry the requests its engine took and the requests it finished;
each reply is the replica asking for as much work as it took, so a fast replica gets more and
none sits on a queue while another idles at the end of the run (work a replica has taken
cannot move, so the inbox is kept short). The driver decides nothing else: which requests,
in what order, comes from the caller's source (`ContinuousRollout` opens shards as it goes).

A replica that dies (its process killed, its node lost) is restarted by Ray (`max_restarts`),
and the requests it held (taken or queued) are re-sent to the replicas that are up: a
request's completions depend only on its prompt and seed, so a re-sent request gives the same
traces. A result of a request already re-sent elsewhere is dropped. The driver's durable state
(which problems are in) belongs to the caller (`ContinuousRollout`'s partial files).

Requests and completions cross Ray as plain tuples (`wire_request`, `wire_completion`), rebuilt
into the dataclasses on the far side: cloudpickle over a list of dataclasses measured ~7x slower
than over the same fields in tuples, and each submit and poll is paid on the driver (NOTES.md).

Written here rather than on `ray.util.queue.Queue` (an actor around an asyncio queue): a
shared queue does not say which replica took a request, so the requests of a dead replica
could not be re-sent without re-sending everything in flight, and each put and get is one
more actor call per request. Ray Data's LLM processors and Ray Serve LLM were measured as the
alternatives (README, scale section).
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import os
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Iterator

from factory.engines.base import Completion, EngineConfig, Request, Sampling

_END = object()


def wire_request(rid: int, r: Request) -> tuple:
    """A request as it crosses Ray: (id, prompt, the Sampling's fields in order)."""
    s = r.sampling
    return rid, r.prompt, (s.n, s.temperature, s.top_p, s.max_tokens, s.seed, tuple(s.stop))


def unwire_request(t: tuple) -> Request:
    rid, prompt, sampling = t
    return Request(rid, prompt, Sampling(*sampling))


def wire_completion(c: Completion) -> tuple:
    """A completion as it crosses Ray: the Completion's fields in order."""
    return c.as_tuple()


class Replica:
    """A Ray actor (threaded: `poll` waits while `submit` runs): one engine, its `stream` in a
    thread, fed from an inbox the driver fills."""

    def __init__(self, make: Callable[[], Any], window: int | None, linger_s: float = 0.05):
        self.engine = make()
        self.window, self.linger_s = window, linger_s
        # one lock, two conditions: the engine thread waits for work when idle, `poll` for news;
        # each is woken only when it has something to wake for (a wake-up costs the engine the GIL)
        lock = threading.Lock()
        self.work, self.news = threading.Condition(lock), threading.Condition(lock)
        self.hungry = threading.Event()  # the inbox ran dry: the driver should hear at once
        self.inbox: collections.deque = collections.deque()
        self.taken: list[int] = []  # request ids the engine took since the last poll
        self.done: list[tuple[int, list[tuple]]] = []  # finished since the last poll, wired
        self.error: str | None = None
        self.in_flight = 0  # touched by the engine thread only
        self.held = 0  # sequences sent here and not yet finished (queued or decoding)
        self.counts = collections.Counter()
        threading.Thread(target=self._run, daemon=True, name="replica-stream").start()

    def info(self) -> dict:
        e = self.engine
        return {"model_name": e.model_name, "max_model_len": e.max_model_len,
                "can_continue": getattr(e, "can_continue", True),
                "window": self.window or getattr(e, "default_window", None), "pid": os.getpid()}

    def submit(self, wired: list[tuple]) -> None:
        """Queue requests (`wire_request` tuples) for the engine."""
        requests = [unwire_request(t) for t in wired]
        with self.work:
            self.inbox.extend(requests)
            self.held += sum(r.sampling.n for r in requests)
            self.counts["most_held"] = max(self.counts["most_held"], self.held)
            self.hungry.clear()
            self.work.notify()

    def poll(self, wait_s: float, wired: list[tuple] | None = None
             ) -> tuple[list[int], list[tuple[int, list[tuple]]], str | None]:
        """Queue `wired` requests (as `submit`) if any, then wait up to `wait_s` for news; return
        (ids taken, (id, completions as `wire_completion` tuples) finished, engine error).
        The driver refills a replica's inbox as it answers, so the refill rides on the next poll:
        one Ray call per reply instead of two, on both sides.
        Once there is news, more is gathered for up to `linger_s` unless the inbox runs dry: a reply
        per finished request would cost the engine's process a Ray call each time (measured: the
        replicas spent ~15% more CPU per token answering every event)."""
        if wired:
            self.submit(wired)
        with self.news:
            self.news.wait_for(self._has_news, timeout=wait_s)
            ready = self._has_news()
        if ready and self.error is None:
            self.hungry.wait(self.linger_s)
        with self.news:
            taken, done, self.taken, self.done = self.taken, self.done, [], []
            return taken, done, self.error

    def _has_news(self) -> bool:
        return bool(self.taken or self.done or self.error)

    def drop(self) -> None:
        """Forget the requests not yet taken (the driver's stream ended early)."""
        with self.work:
            self.held -= sum(r.sampling.n for r in self.inbox)
            self.inbox.clear()

    def stats(self, reset: bool = False) -> dict:
        """Requests, sequences and tokens this replica's engine took and finished (with the times
        of its first take and last answer), the most sequences it held at once (`most_held`:
        queued and decoding), and its engine's own stats where it has them; counted afresh after
        a reset."""
        stats = getattr(self.engine, "stats", None)
        out = {**self.counts, "pid": os.getpid(), **({"engine": stats()} if stats else {})}
        if reset:
            self.counts = collections.Counter()
        return out

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """fn(this replica's engine), here: for benchmarks and checks, while no stream is busy."""
        return fn(self.engine)

    def _source(self) -> Iterator[Request | None]:
        while True:
            with self.work:
                while not self.inbox and not self.in_flight:
                    self.work.wait()  # idle: nothing queued, nothing decoding
                r = self.inbox.popleft() if self.inbox else None
                if r is not None:
                    if not self._has_news():
                        self.news.notify()
                    self.taken.append(r.key)
                    if not self.inbox:
                        self.hungry.set()
                    self.counts.setdefault("first_taken", time.time())
            if r is None:
                yield None  # nothing queued: the engine goes on with what it has in flight
            else:
                self.in_flight += 1
                self.counts["requests"] += 1
                self.counts["sequences"] += r.sampling.n
                yield r

    def _run(self) -> None:
        try:
            for rid, completions in self.engine.stream(self._source(), self.window):
                self.in_flight -= 1
                self.counts["tokens"] += sum(c.num_tokens for c in completions)
                self.counts["last_done"] = time.time()
                with self.news:
                    self.held -= len(completions)
                    if not self._has_news():
                        self.news.notify()
                    self.done.append((rid, [wire_completion(c) for c in completions]))
        except BaseException:  # noqa: BLE001 - handed to the driver, which fails the run with it
            with self.news:
                self.error = traceback.format_exc()[-4000:]
                self.news.notify_all()
            self.hungry.set()


class EngineFleet:
    """`replicas` Replica actors behind the Engine interface; prompts are rendered and
    tokenized here, on the driver, with the model's own tokenizer (`front`)."""

    POLL_S = 2.0
    INTAKE_S = 2.0

    @classmethod
    def of(cls, config: EngineConfig, run_dir: str, replicas: int, actor_options: dict | None = None,
           **kwargs) -> "EngineFleet":
        """Replicas each holding `make_engine(config, run_dir)` (run_dir absolute: actors may run
        on other nodes)."""
        from factory.engines import make_engine

        return cls(functools.partial(make_engine, config, str(run_dir)), _front(config, run_dir), replicas,
                   actor_options, **kwargs)

    def __init__(self, make: Callable[[], Any], front: Any, replicas: int, actor_options: dict | None = None,
                 window: int | None = None, prefetch: int = 2, linger_s: float = 0.05, queue_s: float = 0.5,
                 max_restarts: int = 16,
                 log: Callable[[str], None] = print, start_timeout_s: float = 1800.0):
        """Args:
            make: builds a replica's engine inside its actor (pickled to it).
            front: renders and tokenizes prompts on the driver as the engines would.
            replicas: how many actors.
            actor_options: Ray resources per actor (num_cpus, num_gpus).
            window: sequences in flight per replica (unset: its engine's default).
            prefetch: requests queued in a replica's inbox beyond what its engine took, at least;
                more when it takes them fast (about `queue_s` of its intake, so the inbox does not
                run dry between a reply and the refill it brings).
            linger_s: how long a replica gathers news before it replies (sooner when its inbox runs
                dry). 0.2 s was no better than 0.05 s on 2 cores (the replicas' Ray threads spent
                the same CPU, the driver's refills came later): NOTES.md.
            max_restarts: restarts of one replica (by Ray) before it is given up (a node lost
                now and then over a long run is survived; an engine that crashes on every start is not).
        """
        import ray

        self.log, self.prefetch, self.queue_s = log, max(1, prefetch), queue_s
        # requests per second each replica's engine takes, counted as it finishes them (once its
        # window is full it takes one as one ends): a rate decayed over INTAKE_S, not a per-reply
        # average of what it took, which spiked when a replica took a window's worth at once and
        # then filled that replica's inbox with more than its share (work it held could not move)
        self.intake = [0.0] * replicas
        self.max_restarts = max_restarts
        actor = ray.remote(max_concurrency=4, max_restarts=max_restarts)(Replica)
        self.replicas = [actor.options(**(actor_options or {})).remote(make, window, linger_s)
                         for _ in range(replicas)]
        infos = self._wait([r.info.remote() for r in self.replicas], start_timeout_s, "start")
        self.front = front
        self.model_name = infos[0]["model_name"]
        self.max_model_len = min(i["max_model_len"] for i in infos)
        self.can_continue = all(i["can_continue"] for i in infos)
        self.windows = [i["window"] for i in infos]
        self._ids = itertools.count()
        self._polls: dict[Any, int] = {}  # outstanding poll -> replica; kept across streams, so no reply is lost
        self.restarts = [0] * replicas
        self.ready = [True] * replicas  # False from a replica's death until its first reply after restart
        self.up = [True] * replicas  # False once its restarts are used up

    @staticmethod
    def _wait(refs: list, timeout_s: float, what: str) -> list:
        import ray

        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            raise RuntimeError(f"engine fleet: {len(pending)} of {len(refs)} replicas did not {what} within "
                               f"{timeout_s:.0f} s; does the cluster have the resources (ray.engine_replicas)?")
        return ray.get(refs)

    # -- Engine ----------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None) -> str:
        return self.front.apply_chat_template(messages, chat_template)

    def tokenize(self, prompts: list[str]) -> list:
        return self.front.tokenize(prompts)

    def generate(self, prompts, sampling: list[Sampling], progress: bool = False) -> list[list[Completion]]:
        """All prompts through `stream`, spread over the replicas; results in prompt order."""
        out = dict(self.stream([Request(i, p, s) for i, (p, s) in enumerate(zip(prompts, sampling))]))
        return [out[i] for i in range(len(prompts))]

    def stream(self, requests: Iterable[Request], window: int | None = None) -> Iterator[tuple[Any, list[Completion]]]:
        """Engine.stream over the replicas. `window` is ignored: each replica keeps its own
        engine's window (or the one the fleet was built with) in flight."""
        import ray
        from ray.exceptions import RayActorError

        it, exhausted, waiting = iter(requests), False, False
        pending: dict[int, tuple[int, Request]] = {}  # id -> (replica, the caller's request)
        queued = [set() for _ in self.replicas]  # ids sent to a replica and not yet taken by its engine
        held = [set() for _ in self.replicas]  # ids sent to a replica and not yet finished
        seqs = [0] * len(self.replicas)  # their sequences (a request of n samples is n, as the engines count)
        resend: collections.deque = collections.deque()
        last_reply: dict[int, float] = {}
        try:
            while True:
                batches = collections.defaultdict(list)
                while True:
                    room = [j for j in range(len(self.replicas)) if self.up[j] and self.ready[j]
                            and (len(queued[j]) < self.depth(j) or seqs[j] < (self.windows[j] or 0))]
                    if not room:
                        break
                    if resend:
                        r = resend.popleft()
                    elif exhausted or waiting:
                        break
                    else:
                        r = next(it, _END)
                        if r is _END:
                            exhausted = True
                            break
                        if r is None:  # the caller has nothing until something in flight finishes
                            waiting = True
                            break
                    j = min(room, key=lambda j: (len(queued[j]), len(held[j])))
                    rid = next(self._ids)
                    pending[rid] = (j, r)
                    queued[j].add(rid)
                    held[j].add(rid)
                    seqs[j] += r.sampling.n
                    batches[j].append(wire_request(rid, r))
                polling = set(self._polls.values())
                for j in [j for j in batches if j in polling]:  # the others get theirs with their next poll
                    self.replicas[j].submit.remote(batches.pop(j))  # a lost replica shows in its poll
                if not pending and not resend:
                    if exhausted:
                        return
                    if waiting:
                        raise RuntimeError("stream: the request source is waiting with nothing in flight")
                if not any(self.up):
                    raise RuntimeError("engine fleet: every replica is gone (restarts used up, or its engine failed to start)")
                for j in range(len(self.replicas)):
                    if self.up[j] and j not in self._polls.values():
                        # a replica being restarted answers its first poll at once: then it gets work
                        wait = self.POLL_S if self.ready[j] else 0.2
                        self._polls[self.replicas[j].poll.remote(wait, batches.pop(j, None))] = j
                ready, _ = ray.wait(list(self._polls), num_returns=1)
                for ref in ready:
                    j = self._polls.pop(ref)
                    try:
                        taken, done, error = ray.get(ref)
                    except RayActorError as e:
                        self._lost(j, e, pending, queued, held, resend)
                        seqs[j] = 0  # held[j] is empty now: what it held is being re-sent
                        continue
                    if error is not None:
                        raise RuntimeError(f"engine fleet: the engine of replica {j} failed:\n{error}")
                    self.ready[j] = True
                    queued[j].difference_update(taken)
                    now = time.monotonic()
                    if j in last_reply:  # requests it finished per second, decayed over INTAKE_S
                        self.intake[j] = (self.intake[j] * math.exp(-(now - last_reply[j]) / self.INTAKE_S)
                                          + len(done) / self.INTAKE_S)
                    last_reply[j] = now
                    for rid, completions in done:
                        if pending.get(rid, (None,))[0] != j:
                            continue  # re-sent after this replica was thought lost, or from an earlier stream
                        _, r = pending.pop(rid)
                        held[j].discard(rid)
                        queued[j].discard(rid)
                        seqs[j] -= r.sampling.n
                        waiting = False
                        yield r.key, [Completion(*c) for c in completions]
        finally:
            if pending:  # the caller stopped early: the replicas forget what they have not started
                for j in range(len(self.replicas)):
                    if self.up[j]:
                        self.replicas[j].drop.remote()

    def depth(self, j: int) -> int:
        """How many requests replica j's inbox is kept at: `prefetch`, or `queue_s` of its intake."""
        return max(self.prefetch, int(self.intake[j] * self.queue_s + 0.999))

    def _lost(self, j: int, error: Exception, pending: dict, queued: list, held: list, resend) -> None:
        """Replica j's poll failed. ActorUnavailableError: it died (or cannot be reached) and Ray is
        restarting it; what it held goes to the others, and it gets work again once it answers.
        ActorDiedError: its restarts are used up (or its engine could not start): given up."""
        from ray.exceptions import ActorDiedError

        if self.ready[j]:  # the first failure since its last answer
            for rid in sorted(held[j]):
                resend.append(pending.pop(rid)[1])
            held[j].clear()
            queued[j].clear()
            self.restarts[j] += 1
            self.ready[j] = False
            self.log(f"engine fleet: replica {j} lost ({type(error).__name__}); {len(resend)} requests re-sent")
        if isinstance(error, ActorDiedError):
            self.up[j] = False
            self.log(f"engine fleet: replica {j} given up: {str(error)[:500]}")

    # -- the fleet -------------------------------------------------------------------------

    def stats(self, reset: bool = False) -> list[dict]:
        """Each replica's counts this launch (or since the last reset): requests, sequences,
        tokens, its engine's own stats; and how often it was lost."""
        import ray

        out = []
        for j, r in enumerate(self.replicas):
            try:
                s = ray.get(r.stats.remote(reset), timeout=60) if self.up[j] else {}
            except Exception as e:  # noqa: BLE001 - stats of a lost replica are lost with it
                s = {"error": f"{type(e).__name__}"}
            out.append({**s, "restarts": self.restarts[j]})
        return out

    def close(self) -> None:
        """Stop the replicas (their engines and whatever the actors hold)."""
        import ray

        for r in self.replicas:
            ray.kill(r, no_restart=True)
        self.replicas, self._polls = [], {}


def _front(config: EngineConfig, run_dir) -> Any:
    """What renders and tokenizes prompts on the driver, exactly as the replicas' engines would."""
    if config.backend == "vllm":
        return HFTokenizer(config.model)
    from factory.engines import make_engine  # sim (or server): cheap to build here

    return make_engine(config, run_dir)


class HFTokenizer:
    """The model's tokenizer as transformers loads it (what vLLM loads too): chat template and ids."""

    def __init__(self, model: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
