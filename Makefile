# Two commands on a fresh machine: `make demo` and `make test`.
# The first one installs into .venv (a few minutes); the `lrnnx` command is then .venv/bin/lrnnx
# (or plain `lrnnx` after `source .venv/bin/activate`).
PYTHON ?= python3
# extra arguments of `lrnnx demo`, e.g. make demo DEMO_ARGS="--time-budget 120"
DEMO_ARGS ?=
VENV   := .venv
PY     := $(VENV)/bin/python
# The PyTorch the tests are pinned to (the package itself only asks for torch>=2.4), in the
# build pip finds: a CPU wheel where pip is configured with one (lrnnx's CI machines); from
# PyPI on Linux the default build, which carries CUDA (several GB).  For the CPU-only build
# from PyPI's side: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH  := torch==2.13.0
TORCH_INDEX ?=
# pytest-xdist workers for `make test`: one per core, at most 4 (a 2-core machine runs the suite
# in about half the time: most tests are small and leave the second core idle); TEST_WORKERS=0
# runs it in this process.  Each worker keeps a whole test file, so a file's kernels compile once.
TEST_WORKERS ?= auto

.PHONY: demo test test-slow lint bench clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

$(VENV)/.installed: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e ".[dev]"
	-$(VENV)/bin/lrnnx models > /dev/null  # fills the cache that makes `lrnnx models` instant
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lrnnx demo $(DEMO_ARGS)
	@echo "The lrnnx command is in $(VENV)/bin: run 'source $(VENV)/bin/activate' (then lrnnx models)"
	@echo "or call it as $(VENV)/bin/lrnnx models."

test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

# the long checks (marked slow): documented commands end to end, long sequences
test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow || test $$? -eq 5  # 5: no slow test collected

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(VENV)/.installed
	$(PY) -m lrnnx.cli bench --quick

clean:
	rm -rf $(VENV) build dist src/*.egg-info
