"""Write tables (Markdown, CSV, LaTeX), the raw values, plots and one HTML report."""
import html
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from convert.files import write_text_atomic  # noqa: E402
from results.collect import long_metrics, metrics_records  # noqa: E402
from results.cost import cost_frame, cost_markdown  # noqa: E402
from results.paper_numbers import LINEAR_TOP1  # noqa: E402
from results.tables import REFERENCE_WEIGHTS, format_reference  # noqa: E402


def slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def table_markdown(table, decimals):
    frame = table.frame(decimals)
    body = frame.to_markdown() if len(frame) else "(no runs)"
    return f"## {table.title} ({table.scale})\n\n{body}\n\n" + \
        "".join(f"- {line}\n" for line in table.notes(decimals))


def linear_reference_markdown():
    """The published ImageNet linear top-1 numbers (PROTOCOL.md section 7), one table per
    evaluation: a reference beside the transfer tables (the harness runs no linear table)."""
    parts = ["## Published ImageNet linear classification top-1 (reference)\n",
             "Mean ± std where the source prints one; '-': failed to train. Not measured "
             "here: `make lincls` evaluates one checkpoint at a time.\n"]
    for evaluation, rows in LINEAR_TOP1.items():
        parts.append(f"### {evaluation}\n\n| | top-1 (%) |\n|---|---|")
        parts += [f"| {label} | {format_reference(v)} |" for label, v in rows.items()]
        parts.append("")
    return "\n".join(parts) + "\n"


def smooth(values, window):
    """Centred moving average over `window` iterations (fewer at the ends)."""
    return pd.Series(values, dtype=float).rolling(window, center=True, min_periods=1).mean() \
        .to_numpy()


def smoothing_window(n):
    """Iterations averaged by the smoothed line: about a tenth of the run, odd, at least 3."""
    return max(3, (n // 10) | 1)


def curve_data(runs, task, scale, key="total_loss"):
    """{weights: (iterations, [each seed's loss at every logged iteration], smoothed mean over
    seeds)} from the runs' metrics.json (every iteration: transfer/trainer.metrics_writer)."""
    curves = {}
    for weights, group in runs[(runs["task"] == task) & (runs["scale"] == scale)].groupby(
            "weights", sort=False):
        per_seed = []
        for path in group["path"]:
            recs = {rec["iteration"]: rec[key] for rec in metrics_records(path)
                    if key in rec and "iteration" in rec}
            if recs:
                per_seed.append(recs)
        if not per_seed:
            continue
        its = sorted(set().union(*per_seed))
        raw = [[seed.get(i, np.nan) for i in its] for seed in per_seed]
        mean = np.nanmean(np.array(raw, dtype=float), axis=0)
        curves[weights] = (its, raw, smooth(mean, smoothing_window(len(its))))
    return curves


def loss_curves(runs, task, scale, path):
    """The training loss of every logged iteration, one panel per weights: each seed raw
    (faint), and the mean over seeds smoothed (solid)."""
    curves = curve_data(runs, task, scale)
    if not curves:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves) + 0.8, 3.2),
                             sharey=True, squeeze=False)
    for i, (ax, (weights, (its, raw, smoothed))) in enumerate(zip(axes[0], curves.items())):
        for seed in raw:
            ax.plot(its, seed, color=f"C{i}", alpha=0.35, lw=0.8)
        ax.plot(its, smoothed, color=f"C{i}", lw=2,
                label=f"mean of {len(raw)} seed(s), smoothed over "
                      f"{smoothing_window(len(its))} it.")
        ax.set_title(weights, fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("total loss")
    fig.suptitle(f"{task} ({scale}): training loss at every iteration (faint: each seed)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def delta_bars(table, path):
    """Per metric, each non-supervised row's delta to supervised, with a ±1 std error bar
    (std of the difference of means: sqrt(s1^2/n1 + s2^2/n2))."""
    weights = [w for w in table.weights if w != REFERENCE_WEIGHTS]
    cols = [(t, m) for t, m in table.columns if (REFERENCE_WEIGHTS, t, m) in table.stats]
    if not weights or not cols:
        return False
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(cols) * len(weights)), 3.5))
    width = 0.8 / len(weights)
    for i, w in enumerate(weights):
        deltas, errs = [], []
        for t, m in cols:
            ref, s = table.stats[(REFERENCE_WEIGHTS, t, m)], table.stats.get((w, t, m))
            if s is None or not s.n:
                deltas.append(np.nan)
                errs.append(0)
                continue
            deltas.append(s.mean - ref.mean)
            var = sum((x.std ** 2 / x.n) for x in (s, ref) if x.n >= 2)
            errs.append(np.sqrt(var))
        x = np.arange(len(cols)) + i * width
        ax.bar(x, deltas, width, yerr=errs, capsize=3, label=w)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(cols)) + width * (len(weights) - 1) / 2)
    ax.set_xticklabels([table.column_label(t, m) for t, m in cols], rotation=30, ha="right",
                       fontsize=8)
    ax.set_ylabel("delta to supervised")
    ax.set_title(table.title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(runs, tables, out_dir, decimals=1, bench=None):
    """Write every output under out_dir; returns the list of files written. `bench`: the
    `make bench-tasks` records the cost projections may use (results/cost.py)."""
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    written = []
    md_all = ["# Transfer results\n"]
    html_parts = ["<html><head><meta charset='utf-8'><title>MoCo transfer results</title>"
                  "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
                  "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:3px 6px}"
                  "</style></head><body><h1>MoCo transfer results</h1>"]
    for table in tables:
        name = slug(f"{table.title}_{table.scale}")
        frame = table.frame(decimals)
        md = table_markdown(table, decimals)
        for ext, text in (("md", md), ("csv", table.ci_frame(decimals).to_csv()),
                          ("tex", frame.to_latex() if len(frame) else "")):
            p = os.path.join(out_dir, f"{name}.{ext}")
            write_text_atomic(text, p)
            written.append(p)
        md_all.append(md)
        html_parts.append(f"<h2>{html.escape(table.title)} ({table.scale})</h2>")
        html_parts.append(frame.to_html(escape=True))
        html_parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>"
                                           for n in table.notes(decimals)) + "</ul>")
        bar = os.path.join(out_dir, "plots", f"{name}_deltas.png")
        if delta_bars(table, bar):
            html_parts.append(f"<img src='plots/{os.path.basename(bar)}'>")
            written.append(bar)
        for task in dict.fromkeys(t for t, _ in table.columns):
            curve = os.path.join(out_dir, "plots", f"{slug(task + '_' + table.scale)}_loss.png")
            if loss_curves(runs, task, table.scale, curve):
                html_parts.append(f"<img src='plots/{os.path.basename(curve)}'>")
                written.append(curve)
    cost = cost_markdown(runs, bench or {})
    md_all.append(cost)
    html_parts.append("<pre>" + html.escape(cost) + "</pre>")
    cost_path = os.path.join(out_dir, "cost.csv")
    write_text_atomic(cost_frame(runs).to_csv(index=False), cost_path)
    written.append(cost_path)
    linear = linear_reference_markdown()
    linear_path = os.path.join(out_dir, "paper_linear_top1.md")
    write_text_atomic(linear, linear_path)
    written.append(linear_path)
    html_parts.append("<pre>" + html.escape(linear) + "</pre>")
    raw = long_metrics(runs)
    raw_path = os.path.join(out_dir, "runs.csv")
    write_text_atomic(raw.to_csv(index=False), raw_path)
    status_path = os.path.join(out_dir, "run_status.csv")
    status = runs[["task", "scale", "weights", "seed", "state", "reason", "path"]]
    write_text_atomic(status.to_csv(index=False), status_path)
    html_parts.append("<h2>Every run</h2>" + runs[["task", "scale", "weights", "seed", "state",
                                                    "reason"]].to_html(index=False))
    html_parts.append("</body></html>")
    md_path = os.path.join(out_dir, "results.md")
    write_text_atomic("\n".join(md_all), md_path)
    html_path = os.path.join(out_dir, "report.html")
    write_text_atomic("\n".join(html_parts), html_path)
    return written + [raw_path, status_path, md_path, html_path]
