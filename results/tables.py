"""Runs -> the paper's tables: mean ± std (n) over seeds, deltas to supervised, significance.

Statistics, stated under every table:
- std is the sample standard deviation over seeds (ddof=1); a cell of one run shows no std;
- the delta of a row is its mean minus the supervised row's mean, e.g. "55.9 (+2.4)";
- "*" marks a delta significant at p < 0.05 under Welch's two-sided t-test over seeds
  (needs at least 2 complete seeds on both rows; otherwise no mark can be given);
- under the table, each row's p-values against random init and against supervised, per column.
A table holds any number of pretraining methods: one row per weights name
(`--weights "moco_v2=a.pkl mochi_256_512_0=b.pkl supervised random"`).
Runs are averaged only with runs of the same task, scale and protocol (schedule, global batch,
lr, norm, input sizes, deviations; not the process count, which does not change the protocol); runs that did not complete are listed under the table with the reason.
"""
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from results.paper_numbers import paper_rows

SIGNIFICANCE_LEVEL = 0.05
REFERENCE_WEIGHTS = "supervised"
BASELINES = ("random", "supervised")  # every other row is tested against both
ROW_ORDER = {"random": 0, "supervised": 1}
ROW_LABEL = {"random": "random init", "supervised": "supervised"}


@dataclass
class Stat:
    values: list

    @property
    def n(self):
        return len(self.values)

    @property
    def mean(self):
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self):
        return float(np.std(self.values, ddof=1)) if self.n >= 2 else math.nan


def welch_p(a, b):
    """Two-sided Welch t-test p-value, or None when either side has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    if np.std(a) == 0 and np.std(b) == 0:
        return 0.0 if np.mean(a) != np.mean(b) else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def format_cell(stat, ref=None, decimals=1):
    if stat is None or stat.n == 0:
        return "-"
    f = f"{{:.{decimals}f}}"
    text = f.format(stat.mean)
    if stat.n >= 2:
        text += " ± " + f.format(stat.std)
    text += f" ({stat.n})"
    if ref is not None and ref.n:
        p = welch_p(stat.values, ref.values)
        mark = "*" if p is not None and p < SIGNIFICANCE_LEVEL else ""
        text += f" ({stat.mean - ref.mean:+.{decimals}f}{mark})"
    return text


def format_reference(value):
    """A published number: '-' (not given), '55.9', or '81.1 ± 0.1' (mean ± std over runs)."""
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return f"{value[0]:.1f} ± {value[1]:.1f}"
    return f"{value:.1f}"


def describe_protocol(task, protocol_json):
    p = json.loads(protocol_json or "{}")
    if not p:
        return f"{task}: protocol unknown"
    sizes = p.get("min_size_train", [])
    size_txt = f"{min(sizes)}-{max(sizes)}" if sizes else "?"
    text = (f"{task}: {p['max_iter']} iterations, lr steps {p['steps']}, global batch "
            f"{p['ims_per_batch']}, lr {p['base_lr']}, warmup {p['warmup_iters']}, norm "
            f"{p['norm']}, train short side {size_txt}, test {p['min_size_test']}, scale "
            f"{p['scale']}")
    deviations = p.get("deviations") or []
    return text + "".join(f"; DEVIATION: {d}" for d in deviations)


@dataclass
class Table:
    title: str
    scale: str
    columns: list  # [(task, metric)]
    stats: dict  # {(weights, task, metric): Stat}
    weights: list
    protocols: dict  # task -> protocol json
    excluded: list = field(default_factory=list)  # rows of runs not in the means
    reference_rows: dict = field(default_factory=dict)  # label -> {(task, metric): value}
    sources: dict = field(default_factory=dict)  # weights -> published checkpoint's record

    def column_label(self, task, metric):
        return metric if len({t for t, _ in self.columns}) == 1 else f"{task}: {metric}"

    def frame(self, decimals=1):
        """The displayed table: rows = weights (+ paper rows), columns = metrics."""
        rows = {}
        for w in self.weights:
            cells = {}
            for task, metric in self.columns:
                ref = (self.stats.get((REFERENCE_WEIGHTS, task, metric))
                       if w != REFERENCE_WEIGHTS else None)
                cells[self.column_label(task, metric)] = format_cell(
                    self.stats.get((w, task, metric)), ref, decimals)
            rows[ROW_LABEL.get(w, w)] = cells
        for label, values in self.reference_rows.items():
            rows[label] = {self.column_label(t, m): format_reference(values.get((t, m)))
                           for t, m in self.columns}
        return pd.DataFrame.from_dict(rows, orient="index")

    def notes(self):
        lines = ["Protocol: " + describe_protocol(t, p) for t, p in self.protocols.items()]
        lines.append("Cells: mean ± sample std (ddof=1) over seeds (n); (+d) = delta to the "
                     "supervised row; * = Welch two-sided t-test p < 0.05 over seeds.")
        lines += self.pvalue_lines()
        if self.scale != "full":
            lines.append(f"Scale '{self.scale}': NOT the paper's protocol; paper rows omitted.")
        for w, src in self.sources.items():
            lines.append(f"Weights '{ROW_LABEL.get(w, w)}': published checkpoint {src['name']}, "
                         f"{src['url']}, source sha256 {src['sha256']}")
        for e in self.excluded:
            lines.append(f"Not in the means: {e['task']} / {e['weights']} / seed {e['seed']}: "
                         f"{e['state']}" + (f" ({e['reason']})" if e["reason"] else ""))
        return lines


    def pvalue_lines(self):
        """Per column, one line: each row's Welch two-sided p-value against random init and
        against supervised (the pair supervised / random once); rows without 2 complete
        seeds on both sides are left out."""
        lines = []
        for task, metric in self.columns:
            parts = []
            for w in self.weights:
                tests = []
                # random: none (supervised's line holds the pair); supervised: random; others both
                for base in (BASELINES[:BASELINES.index(w)] if w in BASELINES else BASELINES):
                    a, b = self.stats.get((w, task, metric)), self.stats.get((base, task, metric))
                    p = welch_p(a.values, b.values) if a and b else None
                    if p is not None:
                        tests.append(f"{ROW_LABEL.get(base, base)} p = {p:.3g}")
                if tests:
                    parts.append(f"{ROW_LABEL.get(w, w)} vs " + ", ".join(tests))
            if parts:
                lines.append(f"p-values (Welch, two-sided, over seeds), "
                             f"{self.column_label(task, metric)}: " + "; ".join(parts))
        return lines


def build_tables(runs):
    """Group runs into tables: one per paper table (as each run recorded it), scale and
    protocol variant."""
    if runs.empty:
        return []
    runs = runs.copy()
    # a task's table title: the one its runs recorded, else the task's name
    titles = {t: next((p for p in g if p), t) for t, g in runs.groupby("task")["paper_table"]}
    runs["paper_table"] = runs["task"].map(titles)
    tables = []
    for (title, scale), group in runs.groupby(["paper_table", "scale"], sort=True):
        # protocol variants per task, in order of first appearance (complete runs first)
        ordered = group.sort_values(["state"], key=lambda s: s != "complete", kind="stable")
        variants = {t: list(dict.fromkeys(g["protocol"])) for t, g in ordered.groupby("task")}
        n_variants = max(len(v) for v in variants.values())
        for v in range(n_variants):
            protocols = {t: ps[v] for t, ps in variants.items() if v < len(ps)}
            sel = group[[protocols.get(t) == p for t, p in zip(group["task"], group["protocol"])]]
            tables.append(_one_table(title + (f" [protocol variant {v + 1}]" if v else ""),
                                     scale, sel, protocols))
    return tables


def _one_table(title, scale, runs, protocols):
    columns = []
    for task in sorted(runs["task"].unique()):
        wanted = next((w for w in runs[runs["task"] == task]["metrics_wanted"] if w), None)
        found = sorted({m for ms in runs[runs["task"] == task]["metrics"] for m in ms})
        for metric in (wanted or found):
            columns.append((task, metric))
    stats_ = {}
    complete = runs[runs["state"] == "complete"]
    for r in complete.itertuples():
        for task, metric in columns:
            if r.task == task and metric in r.metrics:
                stats_.setdefault((r.weights, task, metric), Stat([])).values.append(
                    float(r.metrics[metric]))
    weights = sorted(runs["weights"].unique(), key=lambda w: (ROW_ORDER.get(w, 2), w))
    excluded = runs[runs["state"] != "complete"][["task", "weights", "seed", "state", "reason"]]
    reference = {}
    if scale == "full":
        for task in sorted(runs["task"].unique()):
            for label, values in paper_rows(task).items():
                for metric, value in values.items():
                    if (task, metric) in columns:
                        reference.setdefault(label, {})[(task, metric)] = value
    sources = {}
    if "weights_source" in runs:  # the first record of each weights' runs
        for w, src in zip(runs["weights"], runs["weights_source"]):
            if isinstance(src, dict) and w not in sources:
                sources[w] = src
    return Table(title, scale, columns, stats_, weights, protocols,
                 excluded.to_dict("records"), reference, dict(sorted(sources.items())))
