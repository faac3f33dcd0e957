"""MoCo pretraining on a SLURM cluster through submitit, with requeue-and-resume.

    python -m pretrain.submit --nodes 2 --gpus-per-node 8 --partition learnfair --timeout-min 4320 \
        --data /path/to/imagenet/train --output runs/pretrain/moco_v2_r50 [main_moco options]

One task per GPU; submitit exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT and
`main_moco` joins the process group from them. When SLURM preempts or times the job out it is
requeued and resumes from the run directory's checkpoint_last.pth.tar (use
--save-every-iters to bound the lost work).
"""
import argparse
import os
import sys

from convert.errors import UserError
from convert.runtime import program
from pretrain import main_moco


def get_args_parser():
    p = argparse.ArgumentParser("submitit launcher for MoCo pretraining",
                                parents=[main_moco.get_args_parser()], add_help=False)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-task", type=int, default=10)
    p.add_argument("--mem-gb", type=int, default=0, help="0: the partition's default")
    p.add_argument("--partition", default=None)
    p.add_argument("--timeout-min", type=int, default=4320)
    p.add_argument("--job-dir", default="", help="submitit logs (default <output>/slurm)")
    p.add_argument("--dry-run", action="store_true", help="print the job parameters only")
    return p


class Pretrain:
    """The submitted callable; `checkpoint` makes SLURM requeue it and it resumes by itself."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return main_moco.main(self.args)

    def checkpoint(self):
        import submitit

        self.args.resume = ""  # auto-resume from <output>/checkpoint_last.pth.tar
        return submitit.helpers.DelayedSubmission(Pretrain(self.args))


def job_parameters(args):
    params = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                  tasks_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                  timeout_min=args.timeout_min, slurm_signal_delay_s=120, name="moco")
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    return params


def main(args):
    if not args.data:
        raise UserError("--data is required on a cluster (the embedded default is for one CPU)")
    args = main_moco.resolve_args(args)
    # one process per GPU, each with its own cpus_per_task cores: a worker on all but one
    args.workers = (max(1, args.cpus_per_task - 1) if args.workers is None
                    else min(args.workers, args.cpus_per_task))
    job_dir = args.job_dir or os.path.join(args.output, "slurm")
    params = job_parameters(args)
    world = args.nodes * args.gpus_per_node
    print(f"[submit] {world} processes, global batch {args.batch_size}, lr {args.lr}; "
          f"job parameters {params}; logs in {job_dir}")
    if args.dry_run:
        return 0
    import submitit

    executor = submitit.AutoExecutor(folder=job_dir, slurm_max_num_timeout=30)
    executor.update_parameters(**params)
    job = executor.submit(Pretrain(args))
    print(f"[submit] submitted job {job.job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(program(main, get_args_parser()))
