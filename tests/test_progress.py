"""The terminal, the logs and the progress file: library output goes to RUN/logs/, the
terminal keeps one line per stage, and `factory status` follows a run from another process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from factory import console
from factory.run.progress import Progress, status

from test_continuous import ROOT, recipe_data, sim  # noqa: F401  (the simulated teacher fixture)


def test_quiet_sends_library_output_to_the_log(tmp_path, capfd):
    with console.quiet(tmp_path / "logs", "run") as log:
        print("a library's line")
        subprocess.run([sys.executable, "-c", "import sys; print('child stdout'); print('child stderr', file=sys.stderr)"])
        console.say("our own line")
        console.out().write("a bar\n")
    got = capfd.readouterr()
    assert "our own line" in got.out and "a bar" in got.err  # the report on stdout, bars on stderr
    assert "library" not in got.out + got.err and "child" not in got.out + got.err
    text = log.read_text()
    assert "a library's line" in text and "child stdout" in text and "child stderr" in text
    print("after")  # the descriptors are back
    assert "after" in capfd.readouterr().out
    with console.quiet(tmp_path / "logs", "run", verbose=True) as nothing:
        print("shown")
    assert nothing is None and "shown" in capfd.readouterr().out


def test_progress_file_counts_and_eta(tmp_path):
    p = Progress(tmp_path, show=False, every_s=0)
    p.begin("grade", total=4, done=1)
    p.advance(1, rows=10, verdicts={"correct": 3, "wrong": 7})
    p.advance(1, rows=10, verdicts={"correct": 5})
    cur = json.loads((tmp_path / "progress.json").read_text())["current"]
    assert cur["done"] == 3 and cur["total"] == 4 and cur["counts"] == {"rows": 20, "verdicts": {"correct": 8, "wrong": 7}}
    assert cur["eta_s"] is not None and cur["eta_s"] >= 0
    p.finish("finished", summary="the table")
    state = json.loads((tmp_path / "progress.json").read_text())
    assert state["state"] == "finished" and state["current"] is None and state["stages_done"][0]["stage"] == "grade"
    assert "finished" in status(tmp_path) and "3/4 shards" in status(tmp_path) and "the table" in status(tmp_path)


def test_status_follows_a_run_in_progress(sim, tmp_path):  # noqa: F811
    """A `factory run` in another process: progress.json is whole JSON at every read, the
    rollout's counts advance, status says running then finished, the terminal stays short and
    the library output is in RUN/logs/."""
    run = tmp_path / "run"
    data = recipe_data(run, sim, ROOT / "data" / "toy_addition" / "problems.jsonl",
                       run={"progress": True}, rollout={"num_traces": 8, "max_tokens": 600})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", str(recipe)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads, rollout_done, statuses = 0, [], []
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        path = run / "progress.json"
        if path.exists():
            state = json.loads(path.read_bytes())  # never a half-written file
            reads += 1
            cur = state["current"]
            if cur and cur["stage"] == "rollout":
                rollout_done.append((cur["done"], cur["counts"].get("tokens", 0)))
                if len(statuses) < 3 and cur["done"] > (len(statuses) and statuses[-1][0]):
                    statuses.append((cur["done"], subprocess.run(
                        [sys.executable, "-m", "factory.cli", "status", str(run)], cwd=ROOT, capture_output=True,
                        text=True).stdout))
        time.sleep(0.1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert reads >= 10
    dones = sorted(set(rollout_done))
    assert len(dones) >= 2 and dones[-1][0] > dones[0][0] and dones[-1][1] > dones[0][1], rollout_done
    assert any("running" in s and "now   rollout" in s and "tok/s" in s for _, s in statuses), statuses
    final = subprocess.run([sys.executable, "-m", "factory.cli", "status", str(run)], cwd=ROOT,
                           capture_output=True, text=True).stdout
    assert ": finished" in final and "done  rollout" in final and "done  curate" in final
    assert json.loads((run / "progress.json").read_text())["stages_done"][-1]["stage"] == "curate"
    # the terminal: our lines (a bar per stage, the summary), none of the libraries'
    lines = [ln for ln in (out + err).replace("\r", "\n").splitlines() if ln.strip()]
    assert not any("INFO" in ln or "WARNING" in ln for ln in lines), lines[:20]
    assert any(ln.startswith("rollout") for ln in lines) and "stage" in out + err
    assert (run / "logs" / "run.log").exists()
