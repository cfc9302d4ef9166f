# The two set-up commands of the README: `make run` and `make test` (ruff, then pytest). Both create .venv and install
# everything on a fresh machine. torch is installed first from requirements.txt's pin, so pip takes the
# CPU wheel where one is on disk and never resolves a CUDA build on a CPU box.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/ml100k-tiny.yaml
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S := 0.1
export PYTHONUNBUFFERED := 1

.PHONY: install run test test-fast bench clean

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$$(grep -E '^torch==' requirements.txt)"
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/rosepo run --config $(CONFIG)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra --durations=15 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs .pytest_cache

# Every CPU benchmark of bench/ in turn with its defaults (`python -m bench NAME` runs one), within
# 20 minutes on the 2-core box; the commands and results are in BENCHMARKS.md. The peers it compares
# with (TRL) come from pyproject's `bench` extra, never from requirements.txt. `make test` runs each at a
# tiny size instead (tests/bench/test_bench_smoke.py), TRL's half only where TRL is installed.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench all
