"""A transfer run that also records what tests/test_distributed.py compares between 1 and N
processes: the images of each global batch as every rank loaded them, and the raw loss of
every iteration (detectron2's metrics.json holds medians over 20 iterations).

    python -m tests.dist_worker OUT.json --num-gpus N [train_net arguments]

Started through the project's launcher (``transfer.launch``), exactly as ``train_net`` starts a
run; only the recording is added. A module of its own: the spawned processes import it, and
they must not import tests/conftest.py (which lays out a dataset root of its own).
"""
import itertools
import json
import sys
import time

import detectron2.utils.comm as comm
import torch
from detectron2.engine import default_setup

from transfer import run_dir
from transfer.launch import launch
from transfer.train_net import parse_args, resolve
from transfer.trainer import Trainer

LOSSES = ("total_loss", "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc")


def loaded_image_ids(cfg, iterations):
    """[iteration][rank] -> the image ids this rank's training loader yields."""
    loader = Trainer.build_train_loader(cfg)
    mine = [[d["image_id"] for d in batch] for batch in itertools.islice(loader, iterations)]
    return [list(per_rank) for per_rank in zip(*comm.all_gather(mine))]


def record_run(argv, out):
    """train_net.main's run (results.json included), recording on the way."""
    args = parse_args(argv)
    cfg = resolve(args, comm.get_world_size())
    default_setup(cfg, args)
    local = comm.all_gather([comm.get_local_rank(), comm.get_local_size()])
    ids = loaded_image_ids(cfg, cfg.SOLVER.MAX_ITER)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    results = trainer.train()
    if comm.is_main_process():
        run_dir.write_results(cfg, results)
        history = trainer.storage.histories()
        losses = {k: [v for v, _ in history[k].values()] for k in LOSSES if k in history}
        with open(out, "w") as f:
            json.dump({"image_ids": ids, "losses": losses, "local": local,
                       "world_size": comm.get_world_size()}, f)


def stuck_collective(seconds):
    """Rank 1 alive but never reaching the all_reduce that rank 0 waits in (for `seconds`)."""
    if comm.get_rank() == 1:
        time.sleep(seconds)
        return
    torch.distributed.all_reduce(torch.zeros(1))


def threads_seen():
    """torch's intra-op thread count inside the run."""
    return torch.get_num_threads()


def main(argv):
    out, argv = argv[0], argv[1:]
    args = parse_args(argv)
    launch(record_run, args.num_gpus, args=(argv, out), threads=args.threads)


if __name__ == "__main__":
    main(sys.argv[1:])
