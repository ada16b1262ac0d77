# The two commands of the README. Both set up .venv from requirements.lock first; the
# stamp is keyed on the lock's hash, so a second call installs nothing. The lock is the
# exact CPU set, installed with --no-deps (its header says why: TorchRec's metadata names
# the CUDA fbgemm-gpu), then checked: installed == lock, `pip check` clean but that line.
PY      ?= python3
VENV    := .venv
LOCK    := requirements.lock
STAMP   := $(VENV)/.stamp-$(shell sha256sum $(LOCK) | cut -c1-16)
BIN     := $(VENV)/bin

.PHONY: run test setup bench lint

setup: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@echo "setting up $(VENV) from $(LOCK) (first run only)"
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r $(LOCK)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e '.[serve,dev]'
	$(BIN)/python .ci/check_lock.py --lock $(LOCK)
	touch $@

run: setup
	$(BIN)/genrec quickstart

test: setup
	$(BIN)/ruff check genrec tests benchmarks .ci
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: setup
	$(BIN)/ruff check genrec tests benchmarks .ci

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
