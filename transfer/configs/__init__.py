"""The task registry: one task per YAML file in this folder (``Base-*`` files are bases).

A task's name ends in its schedule (``_1x``, ``_2x``, ``_s1x``, ``_<N>k``); a 2x config is its
1x plus the schedule (``_BASE_``), as detectron2's own configs are written.
"""
import os
import re

from transfer.errors import ConfigError

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))

# Schedule token at the end of a task name -> iterations it must resolve to.
SCHEDULE_TOKENS = {"1x": 90000, "2x": 180000, "s1x": 130000}


def known_tasks():
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".yaml") and not f.startswith("Base-"))


def task_config_path(task):
    """The YAML of a task named by its name (a name only: no path, no ``..``)."""
    path = os.path.join(CONFIG_DIR, f"{task}.yaml")
    if not (isinstance(task, str) and re.fullmatch(r"[A-Za-z0-9_]+", task)) or \
            task not in known_tasks():
        raise ConfigError(f"unknown task {str(task)[:80]!r}; a task is a name, one of: "
                          f"{', '.join(known_tasks())} (python -m transfer.tasks)")
    return path


def schedule_iterations(task):
    """Iterations a task's name promises: '..._2x' -> 180000, '..._24k' -> 24000."""
    token = task.rsplit("_", 1)[-1]
    if token in SCHEDULE_TOKENS:
        return SCHEDULE_TOKENS[token]
    m = re.fullmatch(r"(\d+)k", token)
    if m:
        return int(m.group(1)) * 1000
    raise ValueError(f"task '{task}' does not end in a schedule token (1x, 2x, s1x, <N>k)")
