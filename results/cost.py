"""What the runs cost (results.json's ``cost``, written by transfer/cost.py), per task, and
what a full-protocol run would cost, projected only from full-size iterations.

- The cost table: per task, scale and device, the mean per run of the wall time,
  device-hours (processes x hours), training s/iter (each run's median) and peak memory (the
  largest process), and the device-hours of all its runs; then the suite's total per device.
- The projection to the full protocol comes from full-size iterations only: a full-scale run's
  own measurement, or a `make bench-tasks` record in BENCHMARKS.md (one full-size iteration at
  batch 1 on the machine named there, times the protocol's global batch and iterations). A
  smoke-scale s/iter times the protocol's iterations is no projection (other image sizes,
  batch and proposal counts), so it is never made.
"""
from dataclasses import dataclass

import pandas as pd

BENCH_TASKS_TITLE = "One full-size training iteration per task"
FORMATS = {"wall min / run": "{:.2f}", "device-h / run": "{:.4g}", "s/iter": "{:.3f}",
           "peak MB / process": "{:.0f}", "device-h, all runs": "{:.4g}"}


@dataclass
class BenchTask:
    """One task's row of a `make bench-tasks` record."""
    wall_s: float  # one full-size training iteration at batch 1
    machine: str
    measured: str


def read_bench_tasks(path):
    """{task: BenchTask} from the newest `make bench-tasks` record of BENCHMARKS.md (the
    table tools/bench_tasks.py writes under its machine's heading); {} when there is none."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return {}
    found, machine, measured, in_record = {}, "", "", False
    for line in lines:
        if line.startswith("## ") and BENCH_TASKS_TITLE not in line:
            machine, in_record = line[3:].strip(), False
        elif line.startswith("#"):
            in_record = BENCH_TASKS_TITLE in line
        elif line.startswith("Measured ") and "bench_tasks" in line:
            measured = line.split(" with ")[0][len("Measured "):]
        elif in_record and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            found[cells[0].strip("`")] = BenchTask(float(cells[4]), machine, measured)
    return found


def _runs_with_cost(runs):
    return runs[(runs["state"] == "complete") & runs["cost"].map(bool)]


def cost_frame(runs):
    """One row per (task, scale, device): runs, mean per run, and the sum over its runs."""
    done = _runs_with_cost(runs)
    rows = []
    for (task, scale, device), g in done.groupby(
            [done["task"], done["scale"], done["cost"].map(lambda c: c.get("device", "?"))]):
        costs = list(g["cost"])
        s_iter = [c["s_per_iter"] for c in costs if c.get("s_per_iter") is not None]
        rows.append({
            "task": task, "scale": scale, "device": device, "runs": len(costs),
            "processes": "/".join(str(p) for p in sorted({c.get("processes", 1)
                                                           for c in costs})),
            "wall min / run": sum(c["wall_s"] for c in costs) / len(costs) / 60,
            "device-h / run": sum(c["device_hours"] for c in costs) / len(costs),
            "s/iter": sum(s_iter) / len(s_iter) if s_iter else float("nan"),
            "peak MB / process": sum(max(c.get("peak_memory_mb") or [float("nan")])
                                     for c in costs) / len(costs),
            "device-h, all runs": sum(c["device_hours"] for c in costs)})
    return pd.DataFrame(rows, columns=["task", "scale", "device", "runs", "processes",
                                       "wall min / run", "device-h / run", "s/iter",
                                       "peak MB / process", "device-h, all runs"])


def projections(runs, bench):
    """Per task: (device-hours of one full-protocol run, how it was obtained), from a
    full-scale run's measurement or a bench-tasks record; None where neither exists."""
    out = {}
    for task in sorted(runs["task"].unique()):
        done = _runs_with_cost(runs[runs["task"] == task])
        full = done[done["scale"] == "full"]
        protocol = next((c.get("full_protocol") for c in done["cost"]), None)
        if len(full):
            c = full.iloc[0]["cost"]
            hours = sum(r["device_hours"] for r in full["cost"]) / len(full)
            out[task] = (hours, f"measured: {len(full)} full-scale run(s) on {c['device']}, "
                                f"{c['processes']} process(es)")
        elif task in bench and protocol:
            b = bench[task]
            hours = b.wall_s * protocol["ims_per_batch"] * protocol["max_iter"] / 3600
            out[task] = (hours, f"projected from `make bench-tasks` ({b.machine}; "
                                f"{b.measured}): {b.wall_s:g} s per full-size iteration of 1 "
                                f"image x {protocol['ims_per_batch']} images x "
                                f"{protocol['max_iter']} iterations, one process")
        else:
            out[task] = None
    return out


def cost_markdown(runs, bench):
    """The cost section of the report (Markdown)."""
    frame = cost_frame(runs)
    parts = ["## Cost\n"]
    if frame.empty:
        parts.append("No complete run recorded its cost (runs written before results.json "
                     "had `cost`).\n")
    else:
        shown = frame.copy()
        for column, fmt in FORMATS.items():
            shown[column] = shown[column].map(lambda v, f=fmt: "-" if pd.isna(v) else f.format(v))
        parts.append(shown.to_markdown(index=False) + "\n")
        for device, g in frame.groupby("device"):
            parts.append(f"- Suite total on {device}: {int(g['runs'].sum())} runs, "
                         f"{g['device-h, all runs'].sum():.4g} device-hours (processes x wall "
                         "hours).")
        parts.append("- s/iter: each run's median training iteration (data, forward, "
                     "backward, step), averaged over runs; peak MB: the largest process "
                     "(GPU: torch's peak allocated memory; CPU: peak resident memory).\n")
    parts.append("### One full-protocol run (device-hours)\n")
    for task, found in projections(runs, bench).items():
        parts.append(f"- {task}: " + (
            f"{found[0]:.3g} device-hours, {found[1]}" if found else
            "no full-size measurement (a smoke run's s/iter does not project to the "
            "protocol): `make bench-tasks TASKS=" + task + "` on the target machine, or a "
            "full-scale run"))
    return "\n".join(parts) + "\n"
