"""Runs -> the paper's tables: mean ± std (n) over seeds, deltas to supervised, significance.

Statistics, stated under every table:
- std is the sample standard deviation over seeds (ddof=1); a cell of one run shows no std;
- the delta of a row is its mean minus the supervised row's mean, e.g. "55.9 (+2.4)";
- "*" marks a delta significant at p < 0.05 under Welch's two-sided t-test over seeds
  (needs at least 2 complete seeds on both rows; otherwise no mark can be given);
- under the table, per column: each mean's 95% confidence interval (Student t over seeds,
  n - 1 degrees of freedom), and each row's difference to random init and to supervised with
  its 95% Welch interval and p-value;
- the paper's rows carry their delta to the paper's own supervised row, as the paper prints
  them ("55.9 (+2.4)").
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
CONFIDENCE = 0.95
REFERENCE_WEIGHTS = "supervised"
BASELINES = ("random", "supervised")  # every other row is tested against both
ROW_ORDER = {"random": 0, "supervised": 1}
ROW_LABEL = {"random": "random init", "supervised": "supervised"}
PAPER_SUPERVISED = "paper: supervised"  # the paper's own reference row (its deltas' origin)


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

    @property
    def ci(self):
        return t_interval(self.values)


def t_interval(values, level=CONFIDENCE):
    """The mean's confidence interval (low, high), Student t with n - 1 degrees of freedom:
    mean ± t_{(1 + level) / 2, n - 1} s / sqrt(n); None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sem
    return mean - half, mean + half


def welch_interval(a, b, level=CONFIDENCE):
    """(mean(a) - mean(b), (low, high)): the difference of means and its Welch interval,
    ± t_{(1 + level) / 2, df} sqrt(s_a^2 / n_a + s_b^2 / n_b) with the Welch-Satterthwaite
    df; (difference, None) when either side has fewer than 2 values."""
    diff = float(np.mean(a) - np.mean(b)) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return diff, None
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, (diff, diff)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf((1 + level) / 2, df)) * se
    return diff, (diff - half, diff + half)


def format_interval(interval, decimals=1, signed=False):
    if interval is None:
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{decimals}f}}"
    return f"[{f.format(interval[0])}, {f.format(interval[1])}]"


def format_difference(a, b, decimals=1):
    """'+2.50 [95% CI +0.07, +4.93], p = 0.0494': a difference of means over seeds, its Welch
    interval and Welch's two-sided p-value."""
    diff, interval = welch_interval(a, b)
    p = welch_p(a, b)
    return (f"{diff:+.{decimals}f} [{CONFIDENCE:.0%} CI "
            f"{format_interval(interval, decimals, signed=True)[1:-1]}], p = "
            + ("n/a" if p is None else f"{p:.3g}"))


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


def format_reference(value, ref=None):
    """A published number: '-' (not given), '55.9', or '81.1 ± 0.1' (mean ± std over runs);
    with `ref` (the paper's supervised number), its delta as the paper prints it: '55.9 (+2.4)'."""
    if value is None:
        return "-"
    mean = value[0] if isinstance(value, tuple) else value
    text = f"{mean:.1f} ± {value[1]:.1f}" if isinstance(value, tuple) else f"{mean:.1f}"
    if ref is not None:
        ref_mean = ref[0] if isinstance(ref, tuple) else ref
        text += f" ({mean - ref_mean:+.1f})"
    return text


def paper_supervised_label(labels):
    """The paper's supervised row among a table's reference rows (None if it has none)."""
    return next((label for label in labels if label.startswith(PAPER_SUPERVISED)), None)


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
        sup = paper_supervised_label(self.reference_rows)
        for label, values in self.reference_rows.items():
            ref = self.reference_rows[sup] if sup and label != sup else {}
            rows[label] = {self.column_label(t, m): format_reference(values.get((t, m)),
                                                                     ref.get((t, m)))
                           for t, m in self.columns}
        return pd.DataFrame.from_dict(rows, orient="index")

    def ci_frame(self, decimals=1):
        """The displayed table with, after each column, its means' 95% intervals (the CSV)."""
        frame = self.frame(decimals)
        for task, metric in reversed(self.columns):
            label = self.column_label(task, metric)
            cis = {ROW_LABEL.get(w, w): format_interval(s.ci, decimals) if s else "n/a"
                   for w in self.weights for s in [self.stats.get((w, task, metric))]}
            frame.insert(frame.columns.get_loc(label) + 1, f"{label} {CONFIDENCE:.0%} CI",
                         [cis.get(row, "") for row in frame.index])
        return frame

    def notes(self, decimals=1):
        lines = ["Protocol: " + describe_protocol(t, p) for t, p in self.protocols.items()]
        lines.append("Cells: mean ± sample std (ddof=1) over seeds (n); (+d) = delta to the "
                     "supervised row; * = Welch two-sided t-test p < 0.05 over seeds"
                     + ("; paper rows: (+d) = delta to the paper's supervised row."
                        if paper_supervised_label(self.reference_rows) else "."))
        lines += self.ci_lines(decimals)
        lines += self.pvalue_lines(decimals)
        if self.scale != "full":
            lines.append(f"Scale '{self.scale}': NOT the paper's protocol; paper rows omitted.")
        for w, src in self.sources.items():
            lines.append(f"Weights '{ROW_LABEL.get(w, w)}': published checkpoint {src['name']}, "
                         f"{src['url']}, source sha256 {src['sha256']}")
        for e in self.excluded:
            lines.append(f"Not in the means: {e['task']} / {e['weights']} / seed {e['seed']}: "
                         f"{e['state']}" + (f" ({e['reason']})" if e["reason"] else ""))
        return lines


    def ci_lines(self, decimals=1):
        """Per column, one line: each row's mean with its 95% interval (Student t over
        seeds); rows of one seed have none."""
        lines = []
        for task, metric in self.columns:
            parts = [f"{ROW_LABEL.get(w, w)} {s.mean:.{decimals}f} "
                     f"{format_interval(s.ci, decimals)}"
                     for w in self.weights for s in [self.stats.get((w, task, metric))]
                     if s and s.ci]
            if parts:
                lines.append(f"{CONFIDENCE:.0%} CI of each mean (Student t over seeds, n - 1 "
                             f"df), {self.column_label(task, metric)}: " + "; ".join(parts))
        return lines

    def pvalue_lines(self, decimals=1):
        """Per column, one line: each row's difference to random init and to supervised, with
        its 95% Welch interval and Welch two-sided p-value (the pair supervised / random
        once); rows without 2 complete seeds on both sides are left out."""
        lines = []
        for task, metric in self.columns:
            parts = []
            for w in self.weights:
                tests = []
                # random: none (supervised's line holds the pair); supervised: random; others both
                for base in (BASELINES[:BASELINES.index(w)] if w in BASELINES else BASELINES):
                    a, b = self.stats.get((w, task, metric)), self.stats.get((base, task, metric))
                    if a and b and welch_p(a.values, b.values) is not None:
                        tests.append(f"{ROW_LABEL.get(w, w)} - {ROW_LABEL.get(base, base)} "
                                     + format_difference(a.values, b.values, decimals))
                parts += tests
            if parts:
                lines.append(f"p-values (Welch, two-sided, over seeds; difference of means, "
                             f"its {CONFIDENCE:.0%} Welch interval), "
                             f"{self.column_label(task, metric)}: " + "; ".join(parts))
        return lines


def protocol_known(protocol_json):
    return bool(json.loads(protocol_json or "{}"))


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
        # protocol variants per task, in order of first appearance (complete runs first); a
        # run whose protocol is unknown (its files unreadable) makes no variant: it is listed
        # under its task's first table, and in the status table
        ordered = group.sort_values(["state"], key=lambda s: s != "complete", kind="stable")
        known = ordered[ordered["protocol"].map(protocol_known)]
        variants = {t: list(dict.fromkeys(g["protocol"])) for t, g in known.groupby("task")}
        for v in range(max((len(ps) for ps in variants.values()), default=0)):
            protocols = {t: ps[v] for t, ps in variants.items() if v < len(ps)}
            sel = group[[protocols.get(t) == p or (v == 0 and not protocol_known(p))
                         for t, p in zip(group["task"], group["protocol"])]]
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
