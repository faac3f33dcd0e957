"""List the tasks and the paper table each reproduces (the registry: ``transfer/configs``).

    python -m transfer.tasks
"""
from tabulate import tabulate

from transfer.config import load_task_config
from transfer.configs import known_tasks


def describe_tasks():
    rows = []
    for task in known_tasks():
        cfg = load_task_config(task)
        rows.append((task, cfg.MOCO_TRANSFER.PAPER_TABLE, cfg.MOCO_TRANSFER.DESCRIPTION))
    return rows


def main():
    print("Transfer tasks (make transfer TASK=<task> WEIGHTS=<.pkl|name|supervised|random>; "
          "names: make zoo):")
    print(tabulate(describe_tasks(), headers=["task", "paper table", "what"]))


if __name__ == "__main__":
    main()
