# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch 2.13.0 is the CPU wheel on this machine's disk; anything newer pulls a CUDA build.
TORCH   ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: venv demo test test-gpu test-slow fault lint bench peers clean reproduce

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,cluster]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/graddyn demo

# Every study's default configuration with its seeds, then the README's "What the studies show"
# tables rebuilt from the generated verdict files (about an hour on 2 cores; not part of CI).
# SIZE=demo runs the demo-sized configurations instead (each block says which size made it).
SIZE    ?= default
reproduce: $(STAMP)
	$(BIN)/python -m graddyn.experiments._reproduce --size $(SIZE) --root runs/reproduce --readme README.md

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The engine, instrument, curvature and influence tests with CUDA as the default device (needs a
# CUDA build of torch; every test is skipped, not failed, where no CUDA device is seen).
test-gpu: $(STAMP)
	GRADDYN_TEST_DEVICE=cuda $(BIN)/python -m pytest -q tests/pergrad tests/zoo \
		tests/instruments tests/curvature tests/influence

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Kills, signals, a full and a read-only disk, a dead torchrun rank, end to end (a few minutes;
# the disk scenarios need root to mount a small tmpfs and are skipped otherwise).
fault: $(STAMP)
	$(BIN)/python -m pytest -q -m fault tests/faults

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# Peers for benchmarks/. BackPACK declares torchvision, which would pull a multi-GB CUDA torch:
# install it without dependencies plus what it really needs.
peers: $(STAMP)
	$(BIN)/pip install -q '.[bench]'
	$(BIN)/pip install -q --no-deps backpack-for-pytorch pyhessian curvlinops-for-pytorch einconv linear_operator

# Speed and memory against the peers, side by side; results are recorded in docs/benchmarks.md.
bench: peers
	$(BIN)/python benchmarks/pergrad.py
	$(BIN)/python benchmarks/winsorize.py
	$(BIN)/python benchmarks/curvature.py
	$(BIN)/python benchmarks/influence.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/real_models.py --size tiny --repeats 7
	$(BIN)/python benchmarks/real_models.py --size medium --repeats 3
	$(BIN)/python benchmarks/conv_rows.py --repeats 10
	$(BIN)/python benchmarks/distributed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
