"""The task registry: one task per YAML file in transfer/configs (``Base-*`` files excluded).

    python -m transfer.tasks      # list the tasks and the paper table each reproduces
"""
import os
import re

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# Schedule token at the end of a task name -> iterations it must resolve to.
SCHEDULE_TOKENS = {"1x": 90000, "2x": 180000, "s1x": 130000}


def known_tasks():
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".yaml") and not f.startswith("Base-"))


def schedule_iterations(task):
    """Iterations a task's name promises: '..._2x' -> 180000, '..._24k' -> 24000."""
    token = task.rsplit("_", 1)[-1]
    if token in SCHEDULE_TOKENS:
        return SCHEDULE_TOKENS[token]
    m = re.fullmatch(r"(\d+)k", token)
    if m:
        return int(m.group(1)) * 1000
    raise ValueError(f"task '{task}' does not end in a schedule token (1x, 2x, s1x, <N>k)")


def describe_tasks():
    from transfer.config import get_cfg

    rows = []
    for task in known_tasks():
        cfg = get_cfg()
        cfg.merge_from_file(os.path.join(CONFIG_DIR, task + ".yaml"))
        rows.append((task, cfg.MOCO_TRANSFER.PAPER_TABLE, cfg.MOCO_TRANSFER.DESCRIPTION))
    return rows


def main():
    from tabulate import tabulate

    print("Transfer tasks (make transfer TASK=<task> WEIGHTS=<.pkl|supervised|random>):")
    print(tabulate(describe_tasks(), headers=["task", "paper table", "what"]))


if __name__ == "__main__":
    main()
