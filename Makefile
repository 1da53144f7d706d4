# The two commands a newcomer runs: `make demo` and `make test`. Both set themselves up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo demo-seeds crosstok-demo test test-slow lint format bench gpu-check clean

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
# every `fit` (e.g. FIT_ARGS="--trainer.max_steps 50 --trainer.val_check_interval 50" for a quick try: checkpoints are
# written at validations, so max_steps must be a multiple of val_check_interval).
# DATA and RUNS are folders: DATA gets tokens.h5, tokenizer/, cache/; RUNS gets one folder per run: teacher/,
# predict/, student-lm/, vanilla-pd/, pdstar/, report/ (and seeds/ for `make demo-seeds`). A trailing slash is dropped.
CORPUS ?= builtin
DATA ?= data/demo
RUNS ?= runs/demo
override DATA := $(patsubst %/,%,$(DATA))
override RUNS := $(patsubst %/,%,$(RUNS))
SEQ_LEN ?= 256
VOCAB ?= 4096
FIT_ARGS ?=
CACHE := $(DATA)/cache/top-0.95-100
CACHE50 := $(DATA)/cache/top-0.95-50
STUDENT_DATA = --data.init_args.val_tokens $(DATA)/tokens.h5 $(FIT_ARGS)

$(DATA)/tokens.h5: | $(BIN)/.installed
	$(BIN)/pd-lightning prepare --input $(CORPUS) --output $(DATA)/tokens.h5 --seq_len $(SEQ_LEN) --vocab_size $(VOCAB)

# The teacher checkpoints at every validation (teacher.ckpt + last.ckpt) and on SIGTERM (last.ckpt); `done` marks the
# finished fit, and a rerun after an interruption resumes from the newest last.ckpt (`--ckpt_path last`).
$(RUNS)/teacher/done: $(DATA)/tokens.h5
	@echo "== teacher: preset demo (1.8M parameters), LM loss (configs/demo/teacher.yaml); a line per validation"
	$(BIN)/pd-lightning fit --config configs/demo/teacher.yaml --data.init_args.path $(DATA)/tokens.h5 \
		--trainer.default_root_dir $(RUNS)/teacher --trainer.callbacks.init_args.dirpath $(RUNS)/teacher \
		$(if $(wildcard $(RUNS)/teacher/last.ckpt),--ckpt_path last) $(FIT_ARGS)
	touch $@

$(CACHE)/index.json: $(RUNS)/teacher/done
	@echo "== the teacher's top-0.95-100 logits of every training token"
	$(BIN)/pd-lightning predict --config configs/cache/top-0.95-100.yaml --model.teacher $(RUNS)/teacher/teacher.ckpt \
		--data.path $(DATA)/tokens.h5 --writer.output $(CACHE) --writer.overwrite true --trainer.enable_progress_bar false \
		--trainer.default_root_dir $(RUNS)/predict
	$(BIN)/pd-lightning cache-info $(CACHE)

$(CACHE50)/index.json: $(RUNS)/teacher/done
	@echo "== the teacher's top-0.95-50 logits of every training token"
	$(BIN)/pd-lightning predict --config configs/cache/top-0.95-100.yaml --model.processor.init_args.k 50 \
		--model.teacher $(RUNS)/teacher/teacher.ckpt --data.path $(DATA)/tokens.h5 --writer.output $(CACHE50) \
		--writer.overwrite true --trainer.enable_progress_bar false --trainer.default_root_dir $(RUNS)/predict
	$(BIN)/pd-lightning cache-info $(CACHE50)

# Three students of the same size, data order, token budget and learning rate; `done` marks a finished fit.
$(RUNS)/student-lm/done: $(CACHE)/index.json
	@echo "== student 1/3: LM loss only (the baseline)"
	$(BIN)/pd-lightning fit --config configs/demo/student_lm.yaml --data.init_args.path $(CACHE) \
		--trainer.default_root_dir $(RUNS)/student-lm $(STUDENT_DATA)
	touch $@

$(RUNS)/vanilla-pd/done: $(CACHE)/index.json
	@echo "== student 2/3: vanilla PD (top-0.95-100, NLL, tau 1, alpha 1)"
	$(BIN)/pd-lightning fit --config configs/demo/student_vanilla_pd.yaml --data.init_args.path $(CACHE) \
		--trainer.default_root_dir $(RUNS)/vanilla-pd $(STUDENT_DATA)
	touch $@

$(RUNS)/pdstar/done: $(CACHE50)/index.json
	@echo "== student 3/3: PD* (top-0.95-50, KLD, tau 2, WSD alpha <= 0.9, WSD LR)"
	$(BIN)/pd-lightning fit --config configs/demo/student_pdstar.yaml --data.init_args.path $(CACHE50) \
		--trainer.default_root_dir $(RUNS)/pdstar $(STUDENT_DATA)
	touch $@

# Each student's lm-eval scores on the seven benchmarks (`pd-lightning validate --eval.*` on its final checkpoint).
# EVAL_DATA defaults to the test fixtures (2-6 hand-written rows per task: this shows the scoring path working, the
# scores themselves say nothing at that size); point it at `pd-lightning eval-data`'s folder for the real benchmarks.
EVAL_DATA ?= tests/fixtures/eval
EVAL_TASKS ?= [hellaswag,winogrande,piqa,mmlu,c3,ceval,gsm8k]
define BENCH
	$(BIN)/pd-lightning validate --config $(1) --data.init_args.path $(2) \
		$(STUDENT_DATA) --trainer.logger false --trainer.default_root_dir $(3) --eval.tasks '$(EVAL_TASKS)' \
		--eval.data_dir $(EVAL_DATA) --eval.output $(3)/bench.json \
		--ckpt_path "$$(ls -t $(3)/lightning_logs/*/checkpoints/*.ckpt | head -n 1)"
endef

$(RUNS)/student-lm/bench.json: $(RUNS)/student-lm/done
	$(call BENCH,configs/demo/student_lm.yaml,$(CACHE),$(RUNS)/student-lm)

$(RUNS)/vanilla-pd/bench.json: $(RUNS)/vanilla-pd/done
	$(call BENCH,configs/demo/student_vanilla_pd.yaml,$(CACHE),$(RUNS)/vanilla-pd)

$(RUNS)/pdstar/bench.json: $(RUNS)/pdstar/done
	$(call BENCH,configs/demo/student_pdstar.yaml,$(CACHE50),$(RUNS)/pdstar)

# The comparison: held-out loss/perplexity of the three with Δ% against LM-only, their lm-eval scores, and their
# validation curves.
demo: $(RUNS)/student-lm/bench.json $(RUNS)/vanilla-pd/bench.json $(RUNS)/pdstar/bench.json
	$(BIN)/pd-lightning report --runs lm-only=$(RUNS)/student-lm vanilla-pd=$(RUNS)/vanilla-pd pd-star=$(RUNS)/pdstar \
		--output $(RUNS)/report
	@echo "Artefacts: tokens + tokenizer $(DATA)/, teacher $(RUNS)/teacher/teacher.ckpt, caches $(DATA)/cache/,"
	@echo "  students $(RUNS)/{student-lm,vanilla-pd,pdstar}/ (checkpoints, metrics.csv, config.yaml, bench.json),"
	@echo "  table $(RUNS)/report/report.md, validation curves $(RUNS)/report/curves.png"

# The demo's three students over seeds 1234, 1, 2 (weights and data order), two at a time; the paired Δ% table
# and where the variance comes from (benchmarks/demo_seeds.py; benchmarks/RESULTS.md).
demo-seeds: $(CACHE)/index.json $(CACHE50)/index.json
	$(BIN)/pd-lightning sweep configs/demo/student_lm.yaml configs/demo/student_vanilla_pd.yaml \
		configs/demo/student_pdstar.yaml --scale none --baseline configs/demo/student_lm.yaml --seeds 1234 1 2 --jobs 2 \
		--data_dir $(DATA) --teacher $(RUNS)/teacher/teacher.ckpt --output $(RUNS)/seeds --fit_args "$(FIT_ARGS)"
	$(BIN)/pd-lightning report $(RUNS)/seeds
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/demo_seeds.py $(RUNS)/seeds --data $(DATA)/tokens.h5

# Cross-tokenizer worked example (README: Cross-tokenizer distillation; benchmarks/RESULTS.md), after `make demo`:
# a teacher with its own XTOK_VOCAB-entry BPE (`prepare` of the same corpus; the demo teacher's config, preset and
# 1,200 steps) writes top-0.95-100 caches over the student's 4,096-entry token file (`predict` aligns the two
# tokenizations and maps the teacher's entries onto student ids; mapping rules tail and prefix); then LM-only, vanilla
# PD from the demo teacher (same tokenizer) and vanilla PD from each other-tokenizer cache over seeds 1234, 1, 2,
# paired by seed in held-out bits per byte (benchmarks/crosstok_demo.py prints the table with the caches' aligned
# fraction and mapped mass). Files: $(DATA)/crosstok/ (the teacher's token file + tokenizer),
# $(RUNS)/crosstok/teacher/, $(DATA)/cache/crosstok-*/, $(RUNS)/crosstok/seeds/ (the sweep, report/, crosstok.md).
# On a machine busy with other work, OMP_NUM_THREADS=1 make crosstok-demo (torch's threads otherwise wait on each
# other: the teacher ran 5x slower with 2 threads than with 1 on a loaded 2-core machine).
# Fixed: configs/crosstok/student_vanilla_pd_crosstok.yaml names the cache by it.
XTOK_VOCAB := 8192
XCACHE := $(DATA)/cache/crosstok-$(XTOK_VOCAB)-top-0.95-100
XCACHE_PREFIX := $(DATA)/cache/crosstok-$(XTOK_VOCAB)-prefix-top-0.95-100

$(DATA)/crosstok/tokens.h5: | $(BIN)/.installed
	$(BIN)/pd-lightning prepare --input $(CORPUS) --output $(DATA)/crosstok/tokens.h5 --seq_len $(SEQ_LEN) \
		--vocab_size $(XTOK_VOCAB)

$(RUNS)/crosstok/teacher/done: $(DATA)/crosstok/tokens.h5
	@echo "== teacher with its own $(XTOK_VOCAB)-entry tokenizer: configs/demo/teacher.yaml on $(DATA)/crosstok/tokens.h5"
	$(BIN)/pd-lightning fit --config configs/demo/teacher.yaml --data.init_args.path $(DATA)/crosstok/tokens.h5 \
		--trainer.default_root_dir $(RUNS)/crosstok/teacher --trainer.callbacks.init_args.dirpath $(RUNS)/crosstok/teacher \
		$(if $(wildcard $(RUNS)/crosstok/teacher/last.ckpt),--ckpt_path last) $(FIT_ARGS)
	touch $@

$(XCACHE)/index.json: $(RUNS)/crosstok/teacher/done $(DATA)/tokens.h5
	@echo "== its top-0.95-100 logits over the student's $(DATA)/tokens.h5 (aligned, mapped onto the student's ids)"
	$(BIN)/pd-lightning predict --config configs/cache/top-0.95-100.yaml \
		--model.teacher $(RUNS)/crosstok/teacher/teacher.ckpt --data.path $(DATA)/tokens.h5 --writer.output $(XCACHE) \
		--writer.overwrite true --trainer.enable_progress_bar false --trainer.default_root_dir $(RUNS)/crosstok/predict
	$(BIN)/pd-lightning cache-info $(XCACHE)

$(XCACHE_PREFIX)/index.json: $(RUNS)/crosstok/teacher/done $(DATA)/tokens.h5
	@echo "== the same under the mapping rule prefix (unmatched teacher tokens to their longest student prefix token)"
	$(BIN)/pd-lightning predict --config configs/cache/top-0.95-100.yaml --model.cross_tokenizer_rule prefix \
		--model.teacher $(RUNS)/crosstok/teacher/teacher.ckpt --data.path $(DATA)/tokens.h5 \
		--writer.output $(XCACHE_PREFIX) --writer.overwrite true --trainer.enable_progress_bar false \
		--trainer.default_root_dir $(RUNS)/crosstok/predict
	$(BIN)/pd-lightning cache-info $(XCACHE_PREFIX)

crosstok-demo: $(XCACHE)/index.json $(XCACHE_PREFIX)/index.json $(CACHE)/index.json
	$(BIN)/pd-lightning sweep configs/demo/student_lm.yaml configs/demo/student_vanilla_pd.yaml \
		configs/crosstok/student_vanilla_pd_crosstok.yaml configs/crosstok/student_vanilla_pd_crosstok_prefix.yaml \
		--scale none --baseline configs/demo/student_lm.yaml \
		--seeds 1234 1 2 --jobs 2 --data_dir $(DATA) --teacher $(RUNS)/teacher/teacher.ckpt \
		--output $(RUNS)/crosstok/seeds --fit_args "$(FIT_ARGS)"
	$(BIN)/pd-lightning report $(RUNS)/crosstok/seeds
	$(BIN)/python benchmarks/crosstok_demo.py $(RUNS)/crosstok/seeds --cross_cache $(XCACHE) --same_cache $(CACHE) \
		--prefix_cache $(XCACHE_PREFIX) --teachers $(RUNS)/teacher $(RUNS)/crosstok/teacher --output $(RUNS)/crosstok/seeds/crosstok.md

test: setup
	$(BIN)/pytest -q --durations=25

test-slow: setup
	$(BIN)/pytest -q -m slow

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# On a CUDA machine (<= 8 min on one H100/H200): GPU-marked tests + GPU throughput/MFU; DRY=1 for the CPU dry run.
gpu-check: setup
	benchmarks/gpu_check.sh $(if $(DRY),--dry-run,)

bench: setup
	$(BIN)/python benchmarks/loader_throughput.py
	$(BIN)/python benchmarks/cache_size.py
	$(BIN)/python benchmarks/entry_codec_size.py
	$(BIN)/python benchmarks/cache_write_overhead.py
	$(BIN)/python benchmarks/kd_overhead.py
	$(BIN)/python benchmarks/loss_memory.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/eval_throughput.py
	$(BIN)/python benchmarks/eval_full_time.py --scale 2
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/prepare_scaling.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/recorder_overhead.py --reps 21

clean:
	rm -rf runs lightning_logs data/demo data/bench
