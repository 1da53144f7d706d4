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

# The demo pipeline on the embedded corpus; each step is a file target, so an interrupted demo resumes.
$(DEMO)/tokens.h5: | $(BIN)/.installed
	$(BIN)/pd-lightning prepare --input builtin --output $(DEMO)/tokens.h5 --seq_len 256 --vocab_size 4096 --overwrite true

runs/demo-teacher/teacher.ckpt: $(DEMO)/tokens.h5
	$(BIN)/pd-lightning fit --config configs/demo/teacher.yaml

$(DEMO)/cache/top-0.95-100/index.json: runs/demo-teacher/teacher.ckpt
	$(BIN)/pd-lightning predict --config configs/cache/top-0.95-100.yaml --writer.overwrite true --trainer.enable_progress_bar false
	$(BIN)/pd-lightning cache-info $(DEMO)/cache/top-0.95-100

demo: $(DEMO)/cache/top-0.95-100/index.json
	$(BIN)/pd-lightning fit --config configs/demo/student_kd.yaml
	$(BIN)/pd-lightning fit --config configs/demo/student_lm.yaml

test: setup
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python benchmarks/loader_throughput.py
	$(BIN)/python benchmarks/cache_size.py
	$(BIN)/python benchmarks/cache_write_overhead.py
	$(BIN)/python benchmarks/kd_overhead.py
	$(BIN)/python benchmarks/loss_memory.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/eval_throughput.py

clean:
	rm -rf runs lightning_logs $(DEMO) data/bench
