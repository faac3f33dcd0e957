# MoCo pretraining -> conversion -> detectron2 transfer -> results tables.
# Every target installs what it needs first (make setup, idempotent). `make help` lists them.

VENV     ?= .venv
PYTHON   ?= $(VENV)/bin/python
STAMP    := $(VENV)/.setup-stamp
export PYTHONUNBUFFERED := 1

# pretraining
DATA       ?=
NPROC      ?= 1
OUTPUT     ?=
ARCH       ?=
# v1 | v2 (empty: v2; v1 on the embedded data, without DATA)
VERSION    ?=
# moco | end_to_end | memory_bank (--mechanism); MOCHI=N,S,S_PRIME: MoCHi on MoCo v2
MECHANISM  ?=
MOCHI      ?=
EPOCHS     ?=
BATCH_SIZE ?=
ARGS       ?=
# V=1: full logs on the terminal (make demo/transfer/suite show one progress bar per stage)
V          ?=
VERBOSE_FLAG = $(if $(V),--verbose)
# conversion
CKPT ?=
# TRUST=1: load a checkpoint that holds more than data (--trust-checkpoint; it can run code)
TRUST ?=
TRUST_FLAG = $(if $(TRUST),--trust-checkpoint)
# transfer
TASK     ?=
WEIGHTS  ?= random
SEED     ?= 0
SCALE    ?= full
NUM_GPUS ?= 1
DRY_RUN  ?=
# suite / results
TASKS ?=
SEEDS ?= 1
JOBS  ?= 1
RUNS  ?= runs
OUT   ?= results/out

.PHONY: help setup doctor test bench bench-tasks bench-processes bench-mechanisms pretrain lincls supervised convert transfer densepose-fixture tasks suite results demo bench-demo clean

# List the targets and the transfer tasks.
help: $(STAMP)
	@awk '/^# /{c=substr($$0,3)} /^[a-z-]+:/{split($$0,a,":"); if (c!="") printf "  make %-17s %s\n", a[1], c; c=""}' Makefile
	@$(PYTHON) -m transfer.tasks

# Create $(VENV) and install everything pinned (torch, detectron2 v0.6 pure-Python, ...).
setup: $(STAMP)
$(STAMP): requirements.txt pyproject.toml tools/install_detectron2.py
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) tools/install_detectron2.py
	touch $(STAMP)

# Report versions, compiled ops, CUDA, datasets found and which tasks can run.
doctor: $(STAMP)
	$(PYTHON) -m tools.doctor

# Run the whole test suite on CPU.
test: $(STAMP)
	$(PYTHON) -m pytest -q tests

# Benchmarks (pretraining throughput, split augmentation vs PIL, harness overhead, converter,
# results) -> BENCHMARKS.md.
bench: $(STAMP)
	$(PYTHON) -m tools.bench --out BENCHMARKS.md $(ARGS)

# Cost of one full-size training iteration of every task (TASKS=... for some) -> BENCHMARKS.md.
bench-tasks: $(STAMP)
	$(PYTHON) -m tools.bench_tasks --out BENCHMARKS.md $(TASKS)

# MoCo pretraining (DATA=folder; without DATA: the embedded synthetic data, small schedule;
# NPROC=N: N processes through torchrun, one GPU each, or gloo sharing the CPU's cores;
# MECHANISM=end_to_end|memory_bank, MOCHI=N,S,S_PRIME: the paper's other mechanisms, MoCHi).
pretrain: $(STAMP)
	$(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC),$(PYTHON)) -m pretrain.main_moco $(if $(DATA),--data $(DATA)) $(if $(OUTPUT),--output $(OUTPUT)) \
	  $(if $(ARCH),--arch $(ARCH)) $(if $(VERSION),--version $(VERSION)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
	  $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) $(if $(MECHANISM),--mechanism $(MECHANISM)) \
	  $(if $(MOCHI),--mochi $(MOCHI)) $(TRUST_FLAG) $(ARGS)

# Linear classification on frozen features (DATA=labeled folder, CKPT=pretrained checkpoint).
lincls: $(STAMP)
	$(PYTHON) -m pretrain.main_lincls --data $(DATA) --pretrained $(CKPT) $(if $(OUTPUT),--output $(OUTPUT)) $(TRUST_FLAG) $(ARGS)

# Supervised baseline with the same recipe on a labeled folder.
supervised: $(STAMP)
	$(PYTHON) -m pretrain.main_supervised $(if $(DATA),--data $(DATA)) $(if $(OUTPUT),--output $(OUTPUT)) \
	  $(if $(ARCH),--arch $(ARCH)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRUST_FLAG) $(ARGS)

# Convert a checkpoint (CKPT=...) to detectron2's format.
convert: $(STAMP)
	$(PYTHON) convert/to_detectron2.py $(CKPT) $(TRUST_FLAG) $(ARGS)

# Fine-tune and evaluate one task: TASK=name WEIGHTS=<.pkl|supervised|random> SEED SCALE NUM_GPUS.
transfer: $(STAMP)
	$(PYTHON) -m transfer.train_net --task $(TASK) --weights $(WEIGHTS) --seed $(SEED) \
	  --scale $(SCALE) --num-gpus $(NUM_GPUS) $(if $(OUTPUT),--output $(OUTPUT)) \
	  $(if $(DRY_RUN),--dry-run) $(TRUST_FLAG) $(VERBOSE_FLAG) $(ARGS)

# Usage: make densepose-fixture, then
#   DETECTRON2_DATASETS=datasets_densepose make transfer TASK=coco_densepose_fpn_s1x SCALE=smoke
# Write a generated DensePose-COCO dataset (official format) under ROOT (datasets_densepose).
densepose-fixture: $(STAMP)
	$(PYTHON) -m tools.fixtures.densepose $(or $(ROOT),datasets_densepose)

# List the tasks and the paper table each reproduces.
tasks: $(STAMP)
	$(PYTHON) -m transfer.tasks

# Plan and run every TASKS x WEIGHTS x SEEDS run, NUM_GPUS processes each (skips complete ones).
suite: $(STAMP)
	$(PYTHON) -m tools.suite --tasks "$(TASKS)" --weights "$(WEIGHTS)" --seeds $(SEEDS) --jobs $(JOBS) \
	  --num-gpus $(NUM_GPUS) --scale $(SCALE) --runs $(RUNS) $(if $(DRY_RUN),--dry-run) $(VERBOSE_FLAG) $(ARGS)

# Collate the runs under RUNS into the paper's tables and an HTML report under OUT.
results: $(STAMP)
	$(PYTHON) -m results --runs $(RUNS) --out $(OUT) $(ARGS)

# The whole pipeline on generated data, on a CPU, in minutes (CONTROL=1: MoCo weights -> random;
# MECHANISMS="moco end_to_end memory_bank mochi": the other mechanisms and MoCHi beside MoCo).
demo: $(STAMP)
	$(PYTHON) -m tools.demo $(if $(CONTROL),--control-random-moco) $(VERBOSE_FLAG) \
	  $(if $(MECHANISMS),--mechanisms "$(MECHANISMS)") $(ARGS)

# 1 process against N gloo processes on this CPU, and the communication, side by side -> BENCHMARKS.md.
bench-processes: $(STAMP)
	$(PYTHON) -m tools.bench_processes --out BENCHMARKS.md $(ARGS)

# s/iter and memory of moco, end-to-end, memory bank and MoCHi side by side -> BENCHMARKS.md.
bench-mechanisms: $(STAMP)
	$(PYTHON) -m tools.bench_mechanisms --out BENCHMARKS.md $(ARGS)

# Before/after speed of one demo fine-tuning iteration, side by side -> BENCHMARKS.md.
bench-demo: $(STAMP)
	$(PYTHON) -m tools.bench_demo --out BENCHMARKS.md $(ARGS)

clean:
	rm -rf $(VENV) demo_out
