# Two commands on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# two pytest workers (pytest-xdist): a launch leaves a core idle while it imports, waits or polls; the SLURM tests
# share one worker (xdist_group "slurm": one job at a time on the two-node cluster). WORKERS=0 runs in one process.
WORKERS ?= 2
XDIST   := -n $(WORKERS) --dist loadgroup

.PHONY: install test test-fast check demo clean

# torch first, pinned: a CPU machine gets the CPU build, a GPU machine the CUDA build; the
# package's own `torch>=2.11` (pyproject.toml) is then already satisfied and pulls nothing more.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests $(XDIST) $(PYTEST_ARGS)

# The unit and spawned-rank tests, without the real launches (everything under tests/integration is `slow`).
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) launchers/demo.py

clean:
	rm -rf runs/demo
