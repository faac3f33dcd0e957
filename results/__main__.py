"""python -m results --runs runs --out results/out: tables, raw values, plots, HTML report."""
import argparse
import os
import sys

from results.collect import collect
from results.report import table_markdown, write_report
from results.tables import build_tables


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", default="runs", help="root of the run directories")
    p.add_argument("--out", default=os.path.join("results", "out"), help="output folder")
    p.add_argument("--decimals", type=int, default=1)
    args = p.parse_args(argv)
    runs = collect(args.runs)
    if runs.empty:
        print(f"no run directories under {args.runs} (expected {args.runs}/<task>/<weights>/"
              "seed<k>/, as make transfer / make suite write them)", file=sys.stderr)
        return 1
    tables = build_tables(runs)
    files = write_report(runs, tables, args.out, args.decimals)
    for t in tables:
        print(table_markdown(t, args.decimals))
    print(f"{len(runs)} runs, {len(tables)} tables; report: "
          f"{os.path.join(args.out, 'report.html')} ({len(files)} files under {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
