"""Resolve a task into a detectron2 config: task YAML -> weights -> scale -> seed -> overrides.

Every entry point (training, evaluation, inference with a saved config) loads configs through
``get_cfg``/``load_config`` here, which adds this project's keys and registers its modules.
"""
import difflib
import os
import stat

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as d2_get_cfg
from detectron2.engine import DefaultTrainer

import transfer.densepose  # noqa: F401  (registers DensePose's heads, datasets, evaluator)
import transfer.modeling  # noqa: F401  (registers Res5ROIHeadsExtraNorm, DC5 backbone)
import transfer.semseg  # noqa: F401  (registers FCNHead, its datasets and mapper)
from convert.zoo import ZooOptions
from transfer.configs import task_config_path
from transfer.densepose.config import add_densepose_config
from transfer.errors import ConfigError, WeightsError
from transfer.run_dir import run_dir
from transfer.speed import data_workers
from transfer.weights import weights_overrides


def add_moco_transfer_config(cfg):
    cfg.MODEL.DC5 = CN()
    cfg.MODEL.DC5.OUT_CHANNELS = 512
    cfg.MODEL.DC5.NORM = "naiveSyncBN"
    cfg.MODEL.SEM_SEG_HEAD.FCN_DILATION = 6  # FCNHead (transfer/semseg.py)
    cfg.MODEL.SEM_SEG_HEAD.SCALE_RANGE = (0.5, 2.0)  # SemSegCropMapper random scale
    add_densepose_config(cfg)
    cfg.MOCO_TRANSFER = CN()
    cfg.MOCO_TRANSFER.TASK = ""  # set from the config file's name
    cfg.MOCO_TRANSFER.PAPER_TABLE = ""  # which table of the paper the task reproduces
    cfg.MOCO_TRANSFER.DESCRIPTION = ""
    cfg.MOCO_TRANSFER.METRICS = []  # "<evaluator key>/<metric>" columns of the results table
    cfg.MOCO_TRANSFER.WEIGHTS = ""  # the run's weights name: random, supervised, or a ckpt name
    cfg.MOCO_TRANSFER.WEIGHTS_SHA256 = ""
    cfg.MOCO_TRANSFER.WEIGHTS_FORMAT = ""
    # a published checkpoint named in the weights spec (convert/zoo.py): its name, the URL its
    # source file came from and that file's sha256 (WEIGHTS_SHA256 is the converted input's)
    cfg.MOCO_TRANSFER.WEIGHTS_ZOO_NAME = ""
    cfg.MOCO_TRANSFER.WEIGHTS_SOURCE_URL = ""
    cfg.MOCO_TRANSFER.WEIGHTS_SOURCE_SHA256 = ""
    cfg.MOCO_TRANSFER.SCALE = "full"
    # processes of the run (GPUs, or gloo processes on a CPU): a record, not the protocol; the
    # protocol's batch is SOLVER.IMS_PER_BATCH, the global batch, whatever the process count
    cfg.MOCO_TRANSFER.NUM_GPUS = 1
    # where the run departs from its task's protocol, in words (shown under the tables)
    cfg.MOCO_TRANSFER.DEVIATIONS = []
    # --trust-checkpoint: weights and checkpoints that hold more than data are fully unpickled
    # (convert/safe_load.py); recorded with the run
    cfg.MOCO_TRANSFER.TRUST_CHECKPOINT = False


MAX_YAML_BYTES = 1 << 20  # a config file is a few kB


class SafeCfgNode(CN):
    """detectron2's CfgNode whose YAML files, every ``_BASE_`` included, are parsed with
    ``yaml.safe_load`` only. detectron2's ``merge_from_file`` asks fvcore to fall back to
    ``yaml.unsafe_load`` when the safe load fails, which runs the code a YAML tag names
    (``!!python/object/apply:os.system``); here that fallback is never taken, and a config or
    base is read only from a local regular file (no URL, FIFO or device) of at most 1 MiB."""

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        return super().load_yaml_with_base(filename, allow_unsafe=False)

    @classmethod
    def _open_cfg(cls, filename):
        if "://" in str(filename):
            raise ConfigError(f"config {filename}: a URL; configs are local files")
        fd = os.open(filename, os.O_RDONLY | os.O_NONBLOCK)
        f = os.fdopen(fd, "r")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_YAML_BYTES:
            f.close()
            raise ConfigError(f"config {filename}: not a regular file of at most "
                              f"{MAX_YAML_BYTES} bytes")
        return f

    def merge_from_file(self, cfg_filename, allow_unsafe=False):
        """Merge a YAML file; what is wrong with it (a tag, bad YAML, an unknown key, a
        ``_BASE_`` cycle) is one ConfigError naming the file."""
        try:
            super().merge_from_file(cfg_filename, allow_unsafe=False)
        except ConfigError:
            raise
        except (yaml.YAMLError, OSError, KeyError, ValueError, TypeError, AssertionError,
                RecursionError) as e:
            what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"config {cfg_filename}: {type(e).__name__}: {what}") from None


def get_cfg():
    cfg = d2_get_cfg()
    add_moco_transfer_config(cfg)
    return SafeCfgNode(cfg)  # every node of the tree a SafeCfgNode


def load_config(path):
    """Load a saved or task config with this project's keys (for evaluation/inference)."""
    cfg = get_cfg()
    cfg.merge_from_file(path)
    return cfg


def load_task_config(task):
    """A task's config as its YAML states it (no weights, scale or overrides applied): the one
    place a task name becomes a config."""
    cfg = get_cfg()
    cfg.merge_from_file(task_config_path(task))
    cfg.MOCO_TRANSFER.TASK = task
    return cfg


# ---------------------------------------------------------------- scales
def scale_full(cfg, max_iter=None):
    return cfg


def scale_smoke(cfg, max_iter=20):
    """The same task, model and evaluation with a tiny schedule and small images (CPU, CI).

    The batch is 2 images, so the lr is scaled linearly from the task's (batch 16). Fewer
    proposals and sampled ROIs keep a CPU iteration in seconds (a C4 head runs res5 on every
    ROI: 512 x 2 ROIs cost ~45 s per iteration on 2 cores)."""
    ratio = max_iter / cfg.SOLVER.MAX_ITER
    cfg.SOLVER.STEPS = tuple(sorted({min(max_iter - 1, max(1, int(round(s * ratio))))
                                     for s in cfg.SOLVER.STEPS}))
    cfg.SOLVER.BASE_LR = cfg.SOLVER.BASE_LR * 2 / cfg.SOLVER.IMS_PER_BATCH
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(1, max_iter // 4))
    cfg.SOLVER.CHECKPOINT_PERIOD = max(1, max_iter // 2)
    if max(cfg.INPUT.MIN_SIZE_TRAIN) > 256:  # small images (tasks already smaller stay as is)
        cfg.INPUT.MIN_SIZE_TRAIN = (224, 256)
        cfg.INPUT.MAX_SIZE_TRAIN = 400
    if cfg.INPUT.MIN_SIZE_TEST > 256:
        cfg.INPUT.MIN_SIZE_TEST = 256
        cfg.INPUT.MAX_SIZE_TEST = 400
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute":
        cfg.INPUT.CROP.SIZE = [min(s, 192) for s in cfg.INPUT.CROP.SIZE]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = min(cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN, 1000)
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = min(cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN, 200)
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = min(cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, 300)
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = min(cfg.MODEL.RPN.POST_NMS_TOPK_TEST, 50)
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.TEST.PRECISE_BN.NUM_ITER = 4
    cfg.TEST.EVAL_PERIOD = 0
    cfg.DATALOADER.NUM_WORKERS = 2
    return cfg


SCALES = {"full": scale_full, "smoke": scale_smoke}


def split_global_batch(cfg, world_size):
    """SOLVER.IMS_PER_BATCH is the global batch, shared equally by the run's processes. With
    SOLVER.REFERENCE_WORLD_SIZE R (detectron2's key), the per-process batch of R processes is
    kept instead and detectron2's linear rule scales the global batch, lr and schedule to
    `world_size` processes (``DefaultTrainer.auto_scale_workers``): a smaller global batch when
    memory forces it, recorded in MOCO_TRANSFER.DEVIATIONS. Returns the config."""
    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    if reference and reference != world_size:
        before = (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER)
        if cfg.SOLVER.IMS_PER_BATCH % reference or \
                cfg.SOLVER.IMS_PER_BATCH * world_size % reference:
            raise ConfigError(
                f"SOLVER.REFERENCE_WORLD_SIZE {reference}: a global batch of "
                f"{cfg.SOLVER.IMS_PER_BATCH} on {reference} processes does not scale to "
                f"{world_size} process(es) with the same batch per process")
        cfg = DefaultTrainer.auto_scale_workers(cfg, world_size)
        cfg.MOCO_TRANSFER.DEVIATIONS = list(cfg.MOCO_TRANSFER.DEVIATIONS) + [
            f"global batch {cfg.SOLVER.IMS_PER_BATCH} instead of {before[0]} "
            f"({cfg.SOLVER.IMS_PER_BATCH // world_size} per process on {world_size} instead "
            f"of {reference}): linear lr rule, lr {before[1]:g} -> {cfg.SOLVER.BASE_LR:g}, "
            f"{before[2]} -> {cfg.SOLVER.MAX_ITER} iterations"]
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} (the global batch) does not "
            f"divide among {world_size} processes; use a process count that divides it")
    return cfg


def machine_settings(cfg, world_size, cuda):
    """The config values this machine and process layout give a run, apart from its protocol:
    the device (cpu where there is no CUDA), the data workers (none for small images on a
    CPU: transfer/speed.py) and the process count. {KEY: value}."""
    settings = {"MOCO_TRANSFER.NUM_GPUS": world_size}
    device = "cuda" if cuda else "cpu"
    if cfg.MODEL.DEVICE != device and not cfg.MODEL.DEVICE.startswith(device):
        settings["MODEL.DEVICE"] = device
    workers = data_workers(cfg, device)
    if workers != cfg.DATALOADER.NUM_WORKERS:
        settings["DATALOADER.NUM_WORKERS"] = workers
    return settings


def setup_cfg(task, weights="random", *, seed=0, scale="full", overrides=(), output=None,
              world_size=1, runs_root="runs", trust=False, cuda=None, zoo_opts=ZooOptions(),
              allow_nonfinite=False):
    """The fully resolved config of one run of `world_size` processes: the task's protocol
    (task YAML -> weights -> scale -> seed), then this machine's settings
    (``machine_settings``; `cuda`: whether the run has GPUs, default whether this machine has;
    False and True give the config of a CPU and of a GPU machine anywhere), then the overrides,
    then the global batch's split (``split_global_batch``). `trust`: --trust-checkpoint;
    `allow_nonfinite`: --allow-nonfinite (pretrained weights holding NaN/Inf are used);
    `zoo_opts`: where published checkpoints named in `weights` are cached (convert/zoo.py)."""
    cfg = load_task_config(task)
    name, wcfg = weights_overrides(weights, trust, zoo_opts, allow_nonfinite)
    try:
        cfg.merge_from_list([x for kv in wcfg.items() for x in kv])
    except (KeyError, ValueError, AssertionError) as e:  # a converted .pkl's metadata
        raise WeightsError(f"weights '{weights}': their config {e}; re-convert them") from None
    cfg.MOCO_TRANSFER.WEIGHTS = name
    cfg.MOCO_TRANSFER.TRUST_CHECKPOINT = trust
    if scale not in SCALES:
        raise ConfigError(f"unknown scale '{scale}'; known: {', '.join(SCALES)}")
    overrides = list(overrides)
    if scale != "full" and "SOLVER.MAX_ITER" in overrides[::2]:
        # a scaled schedule of the requested length (steps and warmup follow it)
        value = overrides[overrides[::2].index("SOLVER.MAX_ITER") * 2 + 1:][:1]
        if not value or not str(value[0]).isdigit():
            raise ConfigError(f"override SOLVER.MAX_ITER {' '.join(map(str, value))}: expected a "
                              "number of iterations")
        SCALES[scale](cfg, int(value[0]))
    else:
        SCALES[scale](cfg)
    cfg.MOCO_TRANSFER.SCALE = scale
    cfg.SEED = seed
    cfg.OUTPUT_DIR = output or run_dir(runs_root, task, name, seed, scale)
    machine = machine_settings(cfg, world_size,
                               torch.cuda.is_available() if cuda is None else cuda)
    # before the overrides: DATALOADER.NUM_WORKERS N still wins
    cfg.merge_from_list([x for kv in machine.items() for x in kv])
    apply_overrides(cfg, overrides)
    cfg = split_global_batch(cfg, world_size)
    cfg.freeze()
    return cfg


def diff_configs(a, b, prefix=""):
    """(dotted key, value in a, value in b) for every leaf that differs."""
    for k, v in a.items():
        if isinstance(v, CN):
            yield from diff_configs(v, b[k], f"{prefix}{k}.")
        elif v != b[k]:
            yield prefix + k, v, b[k]


def config_keys(cfg, prefix=""):
    """Every leaf key of a config, dotted (MODEL.RPN.NMS_THRESH, ...)."""
    for k, v in cfg.items():
        if isinstance(v, CN):
            yield from config_keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def apply_overrides(cfg, overrides):
    """Merge KEY VALUE overrides; an unknown key is named with its nearest valid keys."""
    if len(overrides) % 2:
        raise ConfigError(f"config overrides come in KEY VALUE pairs; '{overrides[-1]}' has "
                          "no value")
    known = set(config_keys(cfg))
    for key, value in zip(overrides[::2], overrides[1::2]):
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(near)}?" if near else \
                "--dry-run prints every key"
            raise ConfigError(f"unknown config key '{key}' in the overrides; {hint}")
        try:
            cfg.merge_from_list([key, value])
        except ValueError as e:  # yacs: the value's type differs from the default's
            raise ConfigError(f"override {key} {value}: {e}") from e
