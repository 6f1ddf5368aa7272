# The two commands: `make demo` and `make test`. Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo chat test parity lint bench bench-pretrain bench-gpu bench-lora bench-peft bench-rl notebooks clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

# the package and what it runs on (make demo, make chat); the test extras on top (make test and the rest)
$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its test extras

demo: $(RUN_STAMP)  ## the four stages on the built-in data: pretrain, SFT, reward model, PPO (out/pipeline/report.md)
	$(PY) -m rlhf.pipeline --out-dir out/pipeline

chat: $(RUN_STAMP)  ## talk to the model make demo trained (out/pipeline/ppo; MODEL=out/pipeline/sft for the SFT model)
	$(PY) -m minigpt.chat --model $(or $(MODEL),out/pipeline/ppo)

test: $(STAMP)  ## run the test suite (CPU, a few minutes)
	$(PY) -m pytest -q

parity: $(STAMP)  ## compare against transformers / huggingface peft, installed in a separate .venv-ref
	bash tests/reference/setup.sh
	PARITY_REQUIRE_REFERENCE=1 $(PY) -m pytest -q -m parity

bench:  ## speed of minigpt vs transformers GPT-2 (benchmarks/bench_model.py, run in .venv-ref; make demo's models too)
	bash tests/reference/setup.sh
	.venv-ref/bin/python benchmarks/bench_model.py $(if $(wildcard out/pipeline/ppo/model.json),--trained out/pipeline/sft out/pipeline/ppo)

bench-pretrain: $(STAMP)  ## nanoGPT's CPU baby run, side by side with nanoGPT's own train.py if NANOGPT=path/to/nanoGPT
	$(PY) benchmarks/bench_pretrain.py $(if $(NANOGPT),--nanogpt $(NANOGPT))

bench-gpu: $(STAMP)  ## the GPU path: bf16 autocast and --compile against float32 (benchmarks/bench_gpu.py; CUDA)
	$(PY) benchmarks/bench_gpu.py

bench-lora:  ## LoRA: train-step time vs full fine-tuning and HF peft, memory, merged inference (benchmarks/bench_lora.py)
	bash tests/reference/setup.sh
	.venv-ref/bin/python benchmarks/bench_lora.py

bench-peft: $(STAMP)  ## full fine-tuning and the 9 PEFT variants side by side (benchmarks/bench_peft.py, 30-85 min)
	$(PY) benchmarks/bench_peft.py

bench-rl: $(STAMP)  ## every alignment method from the same SFT model, 3 seeds, about an hour on 2 cores (benchmarks/bench_rl.py --help; FROM=out/pipeline)
	$(PY) benchmarks/bench_rl.py $(if $(FROM),--from $(FROM))

notebooks: $(STAMP)  ## re-run the notebooks in full mode and save their outputs (one: make notebooks NB=06e_lora)
	$(PY) tests/test_notebooks.py $(NB)

lint: $(STAMP)  ## ruff, if installed (pip install ruff)
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install --quiet ruff
	$(PY) -m ruff check minigpt peft rlhf tests benchmarks

clean:  ## remove the virtual environments, caches and run outputs
	rm -rf $(VENV) .venv-ref out .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
