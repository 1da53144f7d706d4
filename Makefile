# The two commands a newcomer runs: `make demo` and `make test`. Both set themselves up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a bare `pip install lightning` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

# The demo pipeline; each step is a file target, so an interrupted demo resumes (prepare resumes inside a step too).
# Every path comes from these variables, so the same demo-sized pipeline runs on your own corpus:
#   make demo CORPUS="corpus/*.jsonl" DATA=data/mine RUNS=runs/mine
# (README: "Your own corpus, demo-sized"). `make -n demo ...` prints the commands it would run; FIT_ARGS is added to
# every `fit` (e.g. FIT_ARGS="--trainer.max_steps 50" for a quick try).
CORPUS ?= builtin
DATA ?= data/demo
RUNS ?= runs/demo
SEQ_LEN ?= 256
VOCAB ?= 4096
FIT_ARGS ?=
CACHE := $(DATA)/cache/top-0.95-100

$(DATA)/tokens.h5: | $(BIN)/.installed
	$(BIN)/pd-lightning prepare --input $(CORPUS) --output $(DATA)/tokens.h5 --seq_len $(SEQ_LEN) --vocab_size $(VOCAB)

$(RUNS)-teacher/teacher.ckpt: $(DATA)/tokens.h5
	$(BIN)/pd-lightning fit --config configs/demo/teacher.yaml --data.init_args.path $(DATA)/tokens.h5 \
		--trainer.default_root_dir $(RUNS)-teacher --trainer.callbacks.init_args.dirpath $(RUNS)-teacher $(FIT_ARGS)

$(CACHE)/index.json: $(RUNS)-teacher/teacher.ckpt
	$(BIN)/pd-lightning predict --config configs/cache/top-0.95-100.yaml --model.teacher $(RUNS)-teacher/teacher.ckpt \
		--data.path $(DATA)/tokens.h5 --writer.output $(CACHE) --writer.overwrite true --trainer.enable_progress_bar false \
		--trainer.default_root_dir $(RUNS)-predict
	$(BIN)/pd-lightning cache-info $(CACHE)

demo: $(CACHE)/index.json
	$(BIN)/pd-lightning fit --config configs/demo/student_kd.yaml --data.init_args.path $(CACHE) \
		--data.init_args.val_tokens $(DATA)/tokens.h5 --trainer.default_root_dir $(RUNS)-student $(FIT_ARGS)
	$(BIN)/pd-lightning fit --config configs/demo/student_lm.yaml --data.init_args.path $(CACHE) \
		--data.init_args.val_tokens $(DATA)/tokens.h5 --trainer.default_root_dir $(RUNS)-student-lm $(FIT_ARGS)

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
	rm -rf runs lightning_logs data/demo data/bench
