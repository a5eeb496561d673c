"""Rollout on the shared tiny engine: K traces per problem, seeded, over-long prompts rejected."""

from __future__ import annotations

import json

import pytest

from factory import schema, tiny
from factory.stages.rollout import R1_ZERO_TEMPLATE, RolloutConfig, render_prompt, rollout_table

CFG = RolloutConfig(num_traces=8, temperature=1.0, top_p=1.0, max_tokens=32, question_template="{question}")


def problems(questions):
    rows = [{"problem_id": f"p{i}", "question": q, "answer": "1", "domain": "numeric", "choices": None,
             "source": "t", "split": "train"} for i, q in enumerate(questions)]
    return schema.table(rows, schema.PROBLEMS)


def test_k_traces_seeded_and_too_long_rejected(engine):
    table = problems(["What is 1 + 2?", "What is 4 + 4?", "What is " + "9 + " * 200 + "1?"])
    traces, rejected, stats = rollout_table(table, CFG, engine)
    assert rejected.column("drop_reason").to_pylist() == ["prompt_too_long"]
    assert "max_model_len is 256" in rejected.column("detail")[0].as_py()
    assert traces.num_rows == 16
    assert traces.column("sample_index").to_pylist() == list(range(8)) * 2
    assert len(set(traces.column("trace_id").to_pylist())) == 16
    assert stats["generated_tokens"] == sum(traces.column("num_tokens").to_pylist()) > 0
    sampling = json.loads(traces.column("sampling")[0].as_py())
    assert sampling["n"] == 8 and sampling["seed"] is not None
    assert all(t == "length" for t, tr in zip(traces.column("finish_reason").to_pylist(),
                                              traces.column("truncated").to_pylist()) if tr)
    # per-problem seeds: the same problem alone gives the same texts as in a batch
    alone, _, _ = rollout_table(table.slice(1, 1), CFG, engine)
    assert alone.column("text").to_pylist() == traces.column("text").to_pylist()[8:]
    assert alone.column("trace_id").to_pylist() == traces.column("trace_id").to_pylist()[8:]
    # upstream columns ride along unchanged
    assert traces.column_names[: len(schema.PROBLEMS)] == schema.PROBLEMS.names


def test_prompt_formats_and_prefilled_think(engine, tmp_path):
    r1 = RolloutConfig(prompt_format="r1_zero")
    assert render_prompt("What is 2 + 2?", r1, engine) == R1_ZERO_TEMPLATE.format(question="What is 2 + 2?")
    # an R1-distill style template that prefills "<think>\n": the trace gets the tag back
    template = tmp_path / "t.jinja"
    template.write_text(engine.tokenizer.chat_template + "{% if add_generation_prompt %}<think>\n{% endif %}")
    cfg = RolloutConfig(num_traces=2, temperature=1.0, max_tokens=32, question_template="{question}",
                        chat_template=str(template), system_prompt="Be brief.")
    prompt = render_prompt("What is 1 + 1?", cfg, engine)
    assert prompt.startswith("<|im_start|>system\nBe brief.") and prompt.endswith("<think>\n")
    traces, _, _ = rollout_table(problems(["What is 1 + 1?"]), cfg, engine)
    assert all(t.startswith("<think>\n") for t in traces.column("text").to_pylist())


def test_tiny_chat_prompt_matches_the_tokenizer_template(engine):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 3 + 4?"}]
    assert tiny.chat_prompt(msgs) == engine.apply_chat_template(msgs)


def test_dtype_follows_the_cpu():
    from factory.engines import resolve_dtype

    avx2 = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}  # an AVX2 EPYC: bf16 only emulated
    assert resolve_dtype("auto", cuda=False, flags=avx2)[0] == "float32"
    assert resolve_dtype("auto", cuda=False, flags=avx2 | {"avx512f", "avx512_bf16"})[0] == "auto"
    assert resolve_dtype("auto", cuda=False, flags=avx2 | {"amx_bf16", "amx_tile"})[0] == "auto"
    assert resolve_dtype("bfloat16", cuda=False, flags=avx2) == ("bfloat16", "set by the recipe")
    assert resolve_dtype("auto", cuda=True, flags=avx2)[0] == "auto"


def test_dtype_choice_can_be_forced_the_other_way(monkeypatch):
    """FACTORY_CPU_BF16 lets one machine run the suite as either kind of CPU would."""
    from factory.engines import resolve_dtype

    monkeypatch.setenv("FACTORY_CPU_BF16", "emulated")
    assert resolve_dtype("auto", cuda=False) == ("float32", resolve_dtype("auto", cuda=False, flags=set())[1])
    monkeypatch.setenv("FACTORY_CPU_BF16", "native")
    assert resolve_dtype("auto", cuda=False)[0] == "auto"
    assert resolve_dtype("float32", cuda=False)[0] == "float32"  # a recipe's dtype is never overridden
    monkeypatch.setenv("FACTORY_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="FACTORY_CPU_BF16"):
        resolve_dtype("auto", cuda=False)


def test_engine_processes_follow_the_device():
    from factory.engines.inprocess import use_engine_process

    assert use_engine_process(None, cuda=False) is False  # a CPU: engine core and worker in the driver
    assert use_engine_process(None, cuda=True) is True  # a GPU: vLLM's own processes
    assert use_engine_process(True, cuda=False) is True and use_engine_process(False, cuda=True) is False
    # vLLM's parallel groups are process globals: a second engine beside a live one gets its own processes
    assert use_engine_process(None, cuda=False, others_here=1) is True
    with pytest.raises(ValueError, match="another vLLM engine already runs in this process"):
        use_engine_process(False, cuda=False, others_here=1)


def test_an_engine_start_on_a_cpu_reads_the_model_class_in_this_process():
    import os

    from vllm.model_executor.models import registry

    from factory.engines.inprocess import inspect_here

    original = registry._run_in_subprocess
    with inspect_here(cuda=False):  # no CUDA to keep out of this process: no second Python
        assert registry._run_in_subprocess(os.getpid) == os.getpid()
    assert registry._run_in_subprocess is original
    with inspect_here(cuda=True):  # with CUDA, vLLM's own child process
        assert registry._run_in_subprocess is original
