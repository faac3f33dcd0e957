"""Fine-tune and evaluate one transfer task: ``make transfer TASK=... WEIGHTS=...``.

    python -m transfer.train_net --task voc_frcnn_c4_24k --weights moco.pkl --seed 0
    python -m transfer.train_net --task coco_mask_fpn_2x --weights supervised --num-gpus 8
    python -m transfer.train_net --task synthetic_frcnn_fpn_1k --scale smoke --num-gpus 2  # CPU
    torchrun --nproc_per_node 8 -m transfer.train_net --task coco_mask_fpn_2x ...
    python -m transfer.train_net --task voc_frcnn_c4_24k --weights random --dry-run
    ... [KEY VALUE ...]   detectron2 config overrides, applied last

Each run writes <runs>/<task>/<weights>/seed<k>/ (``run_dir.py`` lists the files). An
interrupted run resumes from its last readable checkpoint when started again with the same
arguments, always: detectron2's ``--resume`` is accepted and implied.

Processes (``launch.py``): ``--num-gpus N`` starts N processes on this machine (NCCL, one GPU
each; on a CPU, gloo with the cores shared out), ``--num-machines/--machine-rank/--dist-url``
span machines, and processes started by torchrun or SLURM are recognised from their
environment. SOLVER.IMS_PER_BATCH is the global batch whatever the process count.
"""
import json
import logging
import os
import time

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils.logger import setup_logger

from convert import finite, safe_load, zoo
from convert.runtime import add_process_flags, apply_omp_wait_policy, entry_point
from transfer import cost, run_dir
from transfer.config import diff_configs, setup_cfg
from transfer.configs import task_config_path
from transfer.console import add_console_flags, console_from_args, quiet_run
from transfer.datasets import check_datasets
from transfer.errors import ConfigError
from transfer.launch import external_layout, launch, launch_external
from transfer.trainer import Trainer
from transfer.weights import prepare_weights

logger = logging.getLogger("transfer")


def resolve(args, world_size):
    return setup_cfg(args.task, args.weights, seed=args.seed, scale=args.scale,
                     overrides=args.opts, output=args.output, world_size=world_size,
                     runs_root=args.runs, trust=args.trust_checkpoint,
                     zoo_opts=zoo.options_from_args(args),
                     allow_nonfinite=args.allow_nonfinite)


def print_dry_run(args, world_size):
    """The protocol's config (the same on a laptop and on a GPU node: resolved for GPUs), then
    what this machine changes in it, as comments."""
    protocol = setup_cfg(args.task, args.weights, seed=args.seed, scale=args.scale,
                         overrides=args.opts, output=args.output, world_size=world_size,
                         runs_root=args.runs, trust=args.trust_checkpoint, cuda=True,
                         zoo_opts=zoo.options_from_args(args),
                         allow_nonfinite=args.allow_nonfinite)
    here = resolve(args, world_size)
    print(protocol.dump())
    changed = {k: here_v for k, here_v, v in diff_configs(here, protocol)}
    print("# this machine's settings (not the protocol; applied before the overrides):")
    print("\n".join(f"#   {k}: {v}" for k, v in changed.items()) or "#   none")


def main(args):
    """One process's part of the run (every process runs it)."""
    t0 = time.time()
    cfg = resolve(args, comm.get_world_size())
    check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    default_setup(cfg, args)
    # this project's messages (checkpoint fallback, sampling) in the run's log.txt too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="transfer")
    console = console_from_args(args)
    if comm.is_main_process():
        run_dir.write_started(cfg)
    # quiet console: logs to the run's files, a progress bar
    with quiet_run(cfg, console):
        try:
            start_iter = 0
            if args.eval_only:
                results = Trainer.evaluate_saved(cfg)
            else:
                trainer = Trainer(cfg, console)
                trainer.resume_or_load(resume=True)
                start_iter = trainer.start_iter
                results = trainer.train()
            peak_memory = cost.gather_peak_memory(cfg.MODEL.DEVICE)  # every process
        except BaseException as e:
            if comm.is_main_process():
                run_dir.write_stopped(cfg, e)
            raise
    if comm.is_main_process():
        records = run_dir.read_metrics(os.path.join(cfg.OUTPUT_DIR, run_dir.METRICS_FILE))
        flat = run_dir.write_results(cfg, results, cost=cost.cost_record(
            cfg, time.time() - t0, peak_memory, records, start_iter))
        logger.info("results: %s", json.dumps(flat))
    return results


def get_parser():
    p = default_argument_parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--task", help="a task name (python -m transfer.tasks); or --config-file "
                                  "with a task's YAML from transfer/configs")
    p.add_argument("--weights", default="random",
                   help="a converted .pkl, a published checkpoint's name (python -m convert.zoo "
                        "lists them; fetched, verified, converted and cached on first use), "
                        "LABEL=path.pkl, LABEL=name, 'supervised' (MSRA R-50, the registry's "
                        "msra_r50) or 'random'. A token that is an existing file is the file, "
                        "even where it is also a name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", default="full", help="full (the protocol) or smoke (tiny)")
    p.add_argument("--output", default=None, help="run directory (default <runs>/<task>/...)")
    p.add_argument("--runs", default="runs", help="root of the run directories")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--threads", type=int, default=None,
                   help="on a CPU: intra-op threads of the whole run on this machine, shared "
                        "out among its processes (default: every core)")
    p.add_argument(safe_load.TRUST_FLAG, action="store_true", help=safe_load.TRUST_HELP)
    zoo.add_zoo_flags(p)
    p.add_argument(finite.ALLOW_FLAG, action="store_true", help=finite.ALLOW_HELP)
    add_console_flags(p)
    add_process_flags(p)
    p.set_defaults(dist_url="auto")
    return p


def parse_args(argv=None):
    args = get_parser().parse_args(argv)
    if args.config_file and not args.task:  # a task's own YAML, named by its path
        args.task = os.path.splitext(os.path.basename(args.config_file))[0]
        if os.path.abspath(task_config_path(args.task)) != os.path.abspath(args.config_file):
            raise ConfigError(f"--config-file {args.config_file}: give a task's YAML from "
                              "transfer/configs, or --task NAME")
    if not args.task:
        raise ConfigError("no task: --task NAME (python -m transfer.tasks lists them)")
    task_config_path(args.task)  # an unknown task lists the known ones
    args.opts = args.opts or []
    args.resume = True
    args.config_file = ""  # default_setup copies the file it names; the resolved config is saved
    return args


def run(argv=None):
    """The run a command line describes, in this process and those it starts."""
    return execute(parse_args(argv))


def execute(args, main_func=main):
    """The run of `args`: ``main_func(args)`` in every process of it (train_net's ``main``, or
    a caller's that wraps it, such as the protocol probe's recorder)."""
    layout = external_layout(os.environ)  # started by torchrun / SLURM: this process only
    world = layout.world_size if layout else args.num_gpus * args.num_machines
    if not args.dry_run:  # a published checkpoint: fetched and converted once, before any process
        prepare_weights(args.weights, zoo.options_from_args(args),
                        args.trust_checkpoint)
    cfg = resolve(args, world)  # the user's mistakes show here, before any process starts
    if args.dry_run:
        print_dry_run(args, world)
        return None
    if layout:
        return launch_external(main_func, layout, args=(args,), threads=args.threads)
    check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    try:
        return launch(main_func, args.num_gpus, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,),
                      threads=args.threads)
    except BaseException as e:  # processes stopped from outside could not say so themselves
        if args.machine_rank == 0:
            run_dir.write_stopped_if_running(cfg, e)
        raise


def cli(argv=None):
    """The program: run(), with the user's errors (a bad task, weights, dataset, override,
    image) as one line (a bug keeps its traceback), and the process-wide settings applied
    (convert/runtime.py: this may start the program again, before any work)."""
    args = entry_point(parse_args, argv)
    apply_omp_wait_policy(args.omp_wait_policy)
    return entry_point(execute, args)


if __name__ == "__main__":
    cli()
