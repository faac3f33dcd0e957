"""python -m results --runs runs --out results/out: tables, raw values, plots, HTML report."""
import argparse
import os
import sys

from results.collect import collect
from results.cost import cost_markdown, read_bench_tasks
from results.report import table_markdown, write_report
from results.tables import build_tables


def get_parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", default="runs", help="root of the run directories")
    p.add_argument("--out", default=os.path.join("results", "out"), help="output folder")
    p.add_argument("--decimals", type=int, default=1)
    p.add_argument("--benchmarks", default="BENCHMARKS.md",
                   help="where `make bench-tasks` recorded full-size iterations: the only "
                        "source, beside full-scale runs, of projections to the full protocol")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    runs = collect(args.runs)
    if runs.empty:
        print(f"no run directories under {args.runs} (expected {args.runs}/<task>/<weights>/"
              "seed<k>/, as make transfer / make suite write them)", file=sys.stderr)
        return 1
    tables = build_tables(runs)
    bench = read_bench_tasks(args.benchmarks)
    files = write_report(runs, tables, args.out, args.decimals, bench)
    for t in tables:
        print(table_markdown(t, args.decimals))
    print(cost_markdown(runs, bench))
    print(f"{len(runs)} runs, {len(tables)} tables; report: "
          f"{os.path.join(args.out, 'report.html')} ({len(files)} files under {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
