"""`python -m analysis report`: the study's tables and figures, regenerated from the MLflow runs."""

import argparse
import sys
import time
from pathlib import Path

from tune.config import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2."""

    def error(self, message):
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def build_parser() -> Parser:
    from analysis.fetch import study_experiments

    parser = Parser(prog="python -m analysis", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, required=True)
    p = sub.add_parser("report", help="write REPORT.md, REPORT.html, a PNG per figure and a CSV per table",
                       description="Write the study report from the MLflow runs: by default the latest sweep of every "
                                   "study experiment in the default store.")
    p.add_argument("--experiment", action="extend", nargs="+", metavar="NAME",
                   help=f"experiments to report (repeatable; `report` means its parts; default: all of "
                        f"{', '.join(study_experiments())})")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sweep", metavar="ID", help="report this sweep_id instead of each experiment's latest sweep")
    which.add_argument("--all", action="store_true", help="pool every sweep (a configuration and seed counts once)")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--out", default="reports/study", help="report folder, replaced on each run (default: reports/study)")
    p.add_argument("--command", default="unknown", help="the command that made the runs, for the report's header")
    p.add_argument("--machine", default="unknown", help="what they ran on, for the report's header")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from analysis import fetch, report
        from tune.tracking import resolve_uri

        t0 = time.perf_counter()
        report.check_out(Path(args.out))
        study = fetch.load(resolve_uri(args.tracking_uri), args.experiment, args.sweep, args.all)
        path = report.write(study, Path(args.out), args.command, args.machine)
        attached, not_attached = report.attach(study, Path(args.out))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for why in study.unreadable:
        print(f"left out: {why}", file=sys.stderr)
    for why in not_attached:
        print(f"note: {why}", file=sys.stderr)
    print(f"report of {study.runs['run_id'].nunique()} runs ({study.selection}) written to {path} "
          f"in {time.perf_counter() - t0:.1f} s" + (f"; attached to {attached} sweep run(s) in MLflow" if attached else ""),
          file=sys.stderr)
    from tune import tracking

    server = study.uri if study.uri.startswith("http") else tracking.UI
    print("the runs it read, in the MLflow UI" + ("" if study.uri.startswith("http") else " (`make mlflow-ui`)") + ":",
          file=sys.stderr)
    for line in tracking.experiment_links(tracking.client(study.uri), server, sorted(set(study.runs["experiment"]))):
        print(f"  {line}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
