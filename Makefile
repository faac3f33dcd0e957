# MoCo pretraining -> conversion -> detectron2 transfer -> results tables.
# Every target installs what it needs first (make setup, idempotent). `make help` lists them.

VENV     ?= .venv
PYTHON   ?= $(VENV)/bin/python
STAMP    := $(VENV)/.setup-stamp
# the second environment of `make test`: numpy 2 and current Pillow over $(VENV) (same torch)
VENV_NUMPY2  ?= .venv-numpy2
NUMPY2_STAMP := $(VENV_NUMPY2)/.setup-stamp
# its stated subset: detectron2's imports (the stand-in, the names later numpy/Pillow removed),
# a smoke fine-tuning with evaluation and pretraining, each resumed, with the converter, and
# the converter on pickled numpy arrays
NUMPY2_TESTS := tests/test_detectron2_setup.py::test_plain_detectron2_imports_work_in_the_environment \
  tests/test_detectron2_setup.py::test_every_numpy_and_pillow_name_detectron2_reads_exists \
  tests/test_devices.py tests/test_convert.py::test_msra_style_pkl_of_numpy_arrays_passes_through
# make gpu-check: the wheels and sources a GPU machine's Python 3.12 lacks (tools/gpu_bundle.py),
# and that machine's own Python
BUNDLE     ?= .gpu-bundle
GPU_PYTHON ?= python3
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
# published checkpoints by name (make zoo NAME=x): ZOO_CACHE=folder (default ~/.cache/
# moco-transfer/checkpoints); MIRROR=URL|DIR (tried first) and OFFLINE=1 (no request: the cache
# and MIRROR folders), as for datasets (defined below)
NAME      ?=
ZOO_CACHE ?=
ZOO_FLAGS = $(if $(ZOO_CACHE),--zoo-cache $(ZOO_CACHE)) $(foreach m,$(MIRROR),--mirror $(m)) \
  $(if $(OFFLINE),--offline)
# transfer
TASK     ?=
WEIGHTS  ?= random
SEED     ?= 0
SCALE    ?= full
NUM_GPUS ?= 1
DRY_RUN  ?=
# datasets (make data): DATASET=<name>|voc|lvis|coco_all|all, ROOT (default DETECTRON2_DATASETS or
# ./datasets), MIRROR=<folder or URL> (archives looked up there first), CACHE (archives; default
# ROOT/archives), FETCH_ONLY=1, OFFLINE=1, KEEP_ARCHIVES=0, VERIFY=1, IMAGENET=<folder of tars>,
# CREDENTIALS=<json> (Cityscapes), RECIPES=<override json>
DATASET       ?=
ROOT          ?=
MIRROR        ?=
CACHE         ?=
FETCH_ONLY    ?=
OFFLINE       ?=
KEEP_ARCHIVES ?= 1
VERIFY        ?=
IMAGENET      ?=
CREDENTIALS   ?=
RECIPES       ?=
# suite / results
TASKS ?=
SEEDS ?= 1
JOBS  ?= 1
RUNS  ?= runs
OUT   ?= results/out

.PHONY: zoo help setup doctor data test test-numpy2 gpu-bundle gpu-check bench bench-tasks bench-processes bench-mechanisms pretrain lincls supervised convert transfer densepose-fixture tasks suite results demo bench-demo clean

# List the targets and the transfer tasks.
help: $(STAMP)
	@awk '/^# /{c=substr($$0,3)} /^[a-z-]+:/{split($$0,a,":"); if (c!="") printf "  make %-17s %s\n", a[1], c; c=""}' Makefile
	@$(PYTHON) -m transfer.tasks

# Create $(VENV) and install everything pinned (torch, detectron2 v0.6 pure-Python, ...).
setup: $(STAMP)
$(STAMP): requirements.txt requirements-pinned.txt pyproject.toml tools/install_detectron2.py tools/d2_first_import.py
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt -c requirements-pinned.txt
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) tools/install_detectron2.py
	touch $(STAMP)

# Report versions, compiled ops, CUDA, datasets found and which tasks can run.
doctor: $(STAMP)
	$(PYTHON) -m tools.doctor

# Download, verify, convert and lay out a dataset of the protocol (docs/datasets.md):
# DATASET=voc|voc2007|voc2012|voc_sbd|coco|coco2014|lvis|densepose|cityscapes|imagenet|all.
data: $(STAMP)
	$(PYTHON) -m tools.data $(DATASET) $(if $(ROOT),--root $(ROOT)) $(if $(CACHE),--cache $(CACHE)) \
	  $(foreach m,$(MIRROR),--mirror $(m)) $(if $(FETCH_ONLY),--fetch-only) $(if $(OFFLINE),--offline) \
	  --keep-archives $(KEEP_ARCHIVES) $(if $(VERIFY),--verify) $(if $(IMAGENET),--imagenet $(IMAGENET)) \
	  $(if $(CREDENTIALS),--credentials $(CREDENTIALS)) $(if $(RECIPES),--recipes $(RECIPES)) $(ARGS)

# Run the whole test suite on CPU, then its subset in the numpy 2 environment (test-numpy2).
test: $(STAMP)
	$(PYTHON) -m pytest -q tests
	$(MAKE) --no-print-directory test-numpy2

$(NUMPY2_STAMP): $(STAMP) requirements-numpy2.txt tools/layer_env.py
	$(PYTHON) -m tools.layer_env $(VENV_NUMPY2) requirements-numpy2.txt
	touch $(NUMPY2_STAMP)

# The stated subset on Python 3.11 with numpy 2 and current Pillow, torch as in .venv.
test-numpy2: $(NUMPY2_STAMP)
	$(VENV_NUMPY2)/bin/python -m pytest -q -p no:cacheprovider $(NUMPY2_TESTS)

# Wheels (cp312) and sources a GPU machine's Python 3.12 lacks, into $(BUNDLE) (pip download).
gpu-bundle:
	python3 -m tools.gpu_bundle download $(BUNDLE)

# On a GPU machine (its own python3; $(BUNDLE) carried): install $(BUNDLE) offline, the cuda
# tests (smoke runs with resume), the GPU benchmarks, 2-process NCCL runs (2+ GPUs) -> BENCHMARKS.md.
gpu-check:
	$(GPU_PYTHON) -m tools.gpu_bundle install $(BUNDLE)
	$(GPU_PYTHON) -m tools.gpu_check --out BENCHMARKS.md $(ARGS)

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

# Linear classification on frozen features (DATA=labeled folder, CKPT=checkpoint in any layout
# the converter reads, or a published checkpoint's name).
lincls: $(STAMP)
	$(PYTHON) -m pretrain.main_lincls --data $(DATA) --pretrained $(CKPT) $(if $(OUTPUT),--output $(OUTPUT)) $(TRUST_FLAG) $(ZOO_FLAGS) $(ARGS)

# Supervised baseline with the same recipe on a labeled folder.
supervised: $(STAMP)
	$(PYTHON) -m pretrain.main_supervised $(if $(DATA),--data $(DATA)) $(if $(OUTPUT),--output $(OUTPUT)) \
	  $(if $(ARCH),--arch $(ARCH)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRUST_FLAG) $(ARGS)

# List the published checkpoints by name (method, epochs, checksum kind, cached); NAME=x fetches,
# verifies and converts one (ZOO_CACHE, MIRROR, OFFLINE).
zoo: $(STAMP)
	$(PYTHON) -m convert.zoo $(NAME) $(TRUST_FLAG) $(ZOO_FLAGS) $(ARGS)

# Convert a checkpoint (CKPT=...) to detectron2's format.
convert: $(STAMP)
	$(PYTHON) convert/to_detectron2.py $(CKPT) $(TRUST_FLAG) $(ARGS)

# Fine-tune and evaluate one task: TASK=name WEIGHTS=<.pkl|name|supervised|random> SEED SCALE
# NUM_GPUS (name: a published checkpoint, make zoo).
transfer: $(STAMP)
	$(PYTHON) -m transfer.train_net --task $(TASK) --weights $(WEIGHTS) --seed $(SEED) \
	  --scale $(SCALE) --num-gpus $(NUM_GPUS) $(if $(OUTPUT),--output $(OUTPUT)) \
	  $(if $(DRY_RUN),--dry-run) $(TRUST_FLAG) $(VERBOSE_FLAG) $(ZOO_FLAGS) $(ARGS)

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
	  --num-gpus $(NUM_GPUS) --scale $(SCALE) --runs $(RUNS) $(if $(DRY_RUN),--dry-run) $(VERBOSE_FLAG) \
	  $(ZOO_FLAGS) $(ARGS)

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
	rm -rf $(VENV) $(VENV_NUMPY2) demo_out
