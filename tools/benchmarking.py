"""What every `make bench*` shares: timing training iterations through the harness Trainer, the
machine line each section of BENCHMARKS.md starts from, and sections written whole (replacing
an earlier section of the same title, atomically)."""
import os
import time

import torch
from detectron2.utils.events import EventStorage

from convert.files import write_text_atomic
from convert.machine import cpu_count, cpu_has_fast_bf16, cpu_name

HEADER = "# Benchmarks\n\nWritten by `make bench*`; each section names the machine it ran on.\n"


def machine():
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu_name()}, {cpu_count()} cores, GPU {gpu}, torch {torch.__version__}, "
            f"fast bf16 CPU: {cpu_has_fast_bf16()}")


def write_section(path, text):
    """Replace the section that starts with `text`'s first line (or append it), atomically."""
    title = text.lstrip("\n").splitlines()[0]
    old = open(path).read() if os.path.exists(path) else HEADER
    start = old.find(title + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text.lstrip("\n")
    else:
        level = title.split(" ")[0]  # "##" or "###": the section ends at the next of its level
        ends = [e for e in (old.find(f"\n{h} ", start + len(title))
                            for h in ("#" * n for n in range(1, len(level) + 1))) if e >= 0]
        new = old[:start] + text.lstrip("\n").rstrip("\n") + "\n" + \
            (old[min(ends):] if ends else "")
    write_text_atomic(new, path)


def publish(path, text, tag):
    """Print the section; write it into `path` (if any)."""
    print(text)
    if path:
        write_section(path, text)
        print(f"[{tag}] section written to {path}")


def timed_steps(trainer, count):
    """Run `count` training iterations (hooks, writers, data loading and all) from iteration 0;
    returns [(seconds, total_loss)] per iteration (the loss on the main process only, where
    detectron2 gathers it; nan elsewhere)."""
    out = []
    with EventStorage(0) as trainer.storage:
        trainer.before_train()
        for i in range(count):
            trainer.iter = i
            t0 = time.perf_counter()
            trainer.before_step()
            trainer.run_step()
            trainer.after_step()
            loss = trainer.storage.histories().get("total_loss")
            out.append((time.perf_counter() - t0, loss.latest() if loss else float("nan")))
        trainer.after_train()  # the hooks end (writers flushed and closed)
    return out
