# The two commands a newcomer runs: `make demo` and `make test`. Both set themselves up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := data/demo

.PHONY: setup demo test test-slow lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a bare `pip install lightning` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

$(DEMO)/tokens.h5: | $(BIN)/.installed
	$(BIN)/pd-lightning prepare --input builtin --output $(DEMO)/tokens.h5 --seq_len 256 --vocab_size 4096 --overwrite true

demo: $(DEMO)/tokens.h5
	$(BIN)/pd-lightning fit --config configs/demo/lm.yaml

test: setup
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf runs lightning_logs $(DEMO)
