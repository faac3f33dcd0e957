"""Scan run directories (<runs>/<task>[@scale]/<weights>/seed<k>/) into one table of runs."""
import glob
import json
import os

import pandas as pd

from convert.files import read_json_lines

STATES_IN_MEANS = ("complete",)


def read_record(path):
    """(record, problem) of a run's JSON file: (dict, None) when it holds a JSON object,
    (None, None) when it does not exist, (None, why) when it cannot be read as one (cut short,
    not JSON, not an object)."""
    if not os.path.exists(path):
        return None, None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot be read ({type(e).__name__}: {e})"
    except ValueError as e:
        return None, f"is not valid JSON, cut short or damaged ({e})"
    except RecursionError:
        return None, "is nested too deep to be the run's record"
    if not isinstance(record, dict):
        return None, f"holds a JSON {type(record).__name__}, not the run's record (an object)"
    return record, None


def metrics_records(run_dir):
    """The JSON lines of detectron2's metrics.json (malformed lines skipped)."""
    return read_json_lines(os.path.join(run_dir, "metrics.json"))


def last_iteration(run_dir):
    """Last training iteration recorded in detectron2's metrics.json, or None."""
    its = [r["iteration"] for r in metrics_records(run_dir) if "iteration" in r]
    return its[-1] if its else None


def read_run(run_dir):
    """One row: identity, state (complete/failed/diverged/interrupted/incomplete/unreadable),
    metrics, cost."""
    results, results_problem = read_record(os.path.join(run_dir, "results.json"))
    status, status_problem = read_record(os.path.join(run_dir, "status.json"))
    parts = os.path.normpath(run_dir).split(os.sep)
    task_dir, weights, seed_dir = parts[-3], parts[-2], parts[-1]
    task, _, scale = task_dir.partition("@")
    row = {"task": task, "scale": scale or "full", "weights": weights,
           "seed": int(seed_dir[len("seed"):]) if seed_dir[4:].isdigit() else seed_dir,
           "path": run_dir, "state": "incomplete", "reason": "", "protocol": "",
           "metrics": {}, "metrics_wanted": [], "paper_table": "", "weights_source": None,
           "cost": {}}
    problem = (f"results.json {results_problem}" if results_problem else
               f"status.json {status_problem}" if status_problem and results is None else "")
    if problem:
        # what the other file says places the run (its table); its numbers are not used
        known = status if results_problem else {}
        row.update(state="unreadable", reason=f"{problem}; started again with the same "
                   "command, the run evaluates its final checkpoint and writes it anew",
                   protocol=json.dumps((known or {}).get("protocol", {}), sort_keys=True),
                   paper_table=(known or {}).get("paper_table", ""))
        return row
    status = results or status
    if status is None:
        row["reason"] = "no status.json/results.json (never started through the harness?)"
        return row
    row["state"] = status.get("state", "incomplete")
    row["cost"] = status.get("cost") or {}
    row["protocol"] = json.dumps(status.get("protocol", {}), sort_keys=True)
    row["metrics_wanted"] = status.get("metrics_wanted", [])
    row["paper_table"] = status.get("paper_table", "")
    # a published checkpoint's name, URL and source sha256 (convert/zoo.py), None otherwise
    row["weights_source"] = status.get("weights_source")
    if row["state"] == "complete":
        metrics = status.get("metrics", {})
        row["metrics"] = metrics if isinstance(metrics, dict) else {}
        if not row["metrics"]:
            row["state"], row["reason"] = "failed", "completed without evaluation results"
    elif row["state"] == "running":
        it = last_iteration(run_dir)
        row["state"] = "incomplete"
        row["reason"] = (f"no final result; last logged iteration {it} of "
                         f"{status.get('protocol', {}).get('max_iter')}" if it is not None else
                         "no final result; no iteration logged")
    else:
        row["reason"] = status.get("reason", "")
    return row


def collect(runs_root):
    """DataFrame of every run directory under runs_root (empty frame if none)."""
    dirs = sorted(d for d in glob.glob(os.path.join(runs_root, "*", "*", "seed*"))
                  if os.path.isdir(d))
    rows = [read_run(d) for d in dirs]
    columns = ["task", "scale", "weights", "seed", "path", "state", "reason", "protocol",
               "metrics", "metrics_wanted", "paper_table", "weights_source", "cost"]
    return pd.DataFrame(rows, columns=columns)


def long_metrics(runs):
    """One row per (run, metric): the raw values behind every mean."""
    rows = []
    for r in runs.itertuples():
        for k, v in r.metrics.items():
            rows.append({"task": r.task, "scale": r.scale, "weights": r.weights, "seed": r.seed,
                         "metric": k, "value": v, "state": r.state})
    return pd.DataFrame(rows, columns=["task", "scale", "weights", "seed", "metric", "value",
                                       "state"])
