"""`python -m tune`: train one config, run a sweep, or list the experiment catalogue."""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from tune.config import TrialConfig, UserError, field_help


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit 2."""

    def error(self, message):
        message = message.replace("unrecognized arguments", "unknown arguments")
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrialConfig field, with the field's docstring as help."""
    docs = field_help()
    for f in dataclasses.fields(TrialConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs[f.name]} (default: {f.default})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> TrialConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrialConfig) if getattr(args, f.name) is not None}
    return TrialConfig.from_dict(values)


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v)


def cmd_train(args) -> int:
    import os

    import torch

    from tune import data as datasets
    from tune import record
    from tune.train import train

    cfg = config_from_args(args)
    cfg = cfg.replace(data=datasets.resolve(cfg.data), data_dir=os.path.abspath(cfg.data_dir))
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    parts = [p for p in (args.parts or "").split(",") if p]
    if args.experiment or parts:
        from tune import catalogue

        for name in [args.experiment, *parts]:
            if name and (catalogue.get(name).parts or catalogue.get(name).search):
                raise UserError(f"--experiment {name} is a composite or a search; name the grid experiment the run belongs to")
    if (args.experiment or parts or args.resume) and not args.record:
        raise UserError("--experiment, --parts and --resume describe a record; add --record DIR")
    if args.record:
        from tune.tracking import can_write_in

        if not can_write_in(Path(args.record).absolute()):
            raise UserError(f"--record {args.record} is not a writable folder; pass another")
    dataset = datasets.load(cfg.data, cfg.data_dir)
    print(f"training {cfg.model} (dropout {cfg.dropout}, order {cfg.order}) for {cfg.epochs} epochs on {dataset.source}",
          file=sys.stderr)

    def progress(metrics, _state):
        keys = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds")
        mark = " *" if metrics["improved"] else ""
        print(f"epoch {metrics['epoch']:>3}/{cfg.epochs} " + " ".join(f"{k} {_fmt(metrics[k])}" for k in keys) + mark,
              file=sys.stderr, flush=True)

    if args.record:
        experiment = args.experiment or (parts[0] if parts else None)
        path = Path(args.record) / (record.name_for(experiment, cfg) + record.SUFFIX)
        head = record.header_for(cfg, dataset, experiment, parts or None, args.smoke_record)
        result = record.run(cfg, dataset, path, head, args.resume, args.checkpoint_every, progress)
        print(f"record: {path}", file=sys.stderr)
    else:
        result = train(cfg, dataset, on_epoch=progress)
    if result["stopped_by"] == "error":
        print(f"training diverged: {result['reason']}", file=sys.stderr)
    print(json.dumps({**result, "config": cfg.to_dict()}))
    return 1 if result["stopped_by"] == "error" else 0


def cmd_list(args) -> int:
    from tune import catalogue

    rows = catalogue.describe()
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in ("experiment", "trials", "scheduler")}
    print(f"{'experiment':<{widths['experiment']}}  {'trials':>{widths['trials']}}  {'scheduler':<{widths['scheduler']}}  varies")
    for r in rows:
        print(f"{r['experiment']:<{widths['experiment']}}  {r['trials']:>{widths['trials']}}  "
              f"{r['scheduler']:<{widths['scheduler']}}  {r['varies']}: {r['description']}")
    print("\nASHA ranks a trial only against its group: the trials of the same experiment and model. A composite runs "
          "every part under its own scheduler, in one Ray Tune run, and trains a configuration that several parts "
          "share once (same config, same seed); that trial counts in its ASHA group's rankings and is never stopped "
          "while any of its parts is FIFO.")
    return 0


def cmd_sweep(args) -> int:
    from tune import sweep

    fields = {f.name for f in dataclasses.fields(sweep.SweepArgs)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["experiment"] = values["experiment"] or "report"
    return sweep.run(sweep.SweepArgs(**values))


def cmd_import(args) -> int:
    from tune import record, tracking

    uri = tracking.resolve_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    if args.experiment:
        from tune import catalogue

        catalogue.get(args.experiment)
    records, bad = [], 0
    for path in record.find(args.records):
        try:
            rec = record.read(path)
        except record.RecordError as e:
            print(f"skipped: {' '.join(str(e).split())}", file=sys.stderr)
            bad += 1
            continue
        if not (rec.header.get("experiment") or args.experiment):
            print(f"skipped: record {path} names no catalogue experiment; pass --experiment NAME for it", file=sys.stderr)
            bad += 1
            continue
        records.append(rec)
    client = tracking.client(uri)
    sweep_id = args.sweep_id or f"import-{time.strftime('%Y%m%d-%H%M%S')}"
    imported = 0
    for rec in records:
        run_id = tracking.import_record(client, uri, rec, sweep_id, args.experiment)
        state = "already in the store" if run_id is None else (
            f"run {run_id[:8]}" + ("" if rec.finished else f", killed after epoch {len(rec.epochs)}: imported up to it"))
        print(f"{rec.path.name}: {state}", file=sys.stderr)
        imported += run_id is not None
    print(f"imported {imported} of {len(records) + bad} records into {uri}" + (f"; {bad} skipped" if bad else ""),
          file=sys.stderr)
    return 2 if bad else 0


def cmd_export(args) -> int:
    from analysis.fetch import study_experiments
    from tune import tracking

    uri = tracking.resolve_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    paths = tracking.export_records(tracking.client(uri), study_experiments(), args.sweep_id, Path(args.out))
    if not paths:
        raise UserError(f"no trial runs of sweep {args.sweep_id!r} in {uri}; check --sweep-id and --tracking-uri")
    print(f"wrote {len(paths)} records of sweep {args.sweep_id} to {args.out}", file=sys.stderr)
    return 0


def cmd_check_run(args) -> int:
    """`rerun` and `evaluate`: a logged run checked against what it logged; exit 1 on a mismatch."""
    from tune import rerun, tracking

    check = rerun.rerun if args.command == "rerun" else rerun.evaluate
    result, matched = check(tracking.resolve_uri(args.tracking_uri), args.run_id, args.data)
    if args.command == "rerun":
        print(f"every logged per-epoch metric {'matched' if matched else 'did NOT match'} "
              f"({result['epochs_compared']} epochs)", file=sys.stderr)
    else:
        print(f"test loss {result['test_loss']:.6f}, accuracy {100 * result['test_acc']:.2f} %: "
              f"{'equal to' if matched else 'NOT equal to'} the run's logged test metrics", file=sys.stderr)
    print(json.dumps({**result, "matched": matched}))
    return 0 if matched else 1


def cmd_check_tracking(args) -> int:
    from tune import tracking

    uri = tracking.resolve_uri(args.tracking_uri)
    tracking.check_reachable(uri, args.wait)
    print(f"runs can be logged to {uri}", file=sys.stderr)
    return 0


def cmd_links(args) -> int:
    from analysis.fetch import study_experiments
    from tune import tracking

    uri = tracking.resolve_uri(args.tracking_uri)
    server = args.server or (uri if uri.startswith("http") else tracking.UI)
    client = tracking.client(uri) if not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file() else None
    for line in tracking.experiment_links(client, server, study_experiments()) if client else []:
        print(line)
    return 0


def cmd_study(args) -> int:
    from tune import fanout

    fields = {f.name for f in dataclasses.fields(fanout.StudyArgs)}
    return fanout.run(fanout.StudyArgs(**{k: v for k, v in vars(args).items() if k in fields}))


TRACKING_HELP = "MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)"


def add_trial_list_options(p: argparse.ArgumentParser) -> None:
    """What picks a grid experiment's trials: the same for `sweep` and `study`."""
    p.add_argument("--smoke", action="store_true", help="tiny sizes (2,000 training images, 1,000 eval images, 3 epochs)")
    p.add_argument("--seeds", type=int, default=1, help="repeat every configuration with K seeds (default: 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="fix a config field for every trial, e.g. --set epochs=30; mlp.KEY or cnn.KEY for one model")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="replace (or add) one grid axis, e.g. --grid dropout=0.1,0.5,0.9")
    p.add_argument("--data", help="dataset for every trial (default: cifar10); see `train --help`")


def add_sweep_options(p: argparse.ArgumentParser) -> None:
    from tune.sweep import SweepArgs

    d = SweepArgs(experiment="")
    p.add_argument("experiment", nargs="?", default=None,
                   help="catalogue experiment (see `list`; default: report; with --resume: the resumed sweep's)")
    add_trial_list_options(p)
    p.add_argument("--samples", type=int, default=None, help="trials an Optuna search draws (default: the experiment's)")
    p.add_argument("--scheduler", choices=("asha", "fifo"),
                   help="default: each experiment's own (see `list`): ASHA for dropout grids and searches, FIFO for "
                        "ablations and orders; a composite such as report runs every part under its own. Given, it "
                        "applies to every part: fifo runs every trial to the end. ASHA ranks a trial only against "
                        "its group (the same experiment and model)")
    p.add_argument("--grace-period", type=int,
                   help="ASHA: epochs before the first cut, for every ASHA part of a composite (default: each "
                        "experiment's fraction of its epochs, see `list`)")
    p.add_argument("--reduction-factor", type=int,
                   help="ASHA: keep 1/N at each rung, for every ASHA part of a composite (default: the experiment's, see `list`)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--storage", default=d.storage,
                   help="results and checkpoints (default: ./ray_results); on a multi-node cluster a shared path or cloud URI")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.add_argument("--cpus-per-trial", type=float, default=d.cpus_per_trial, help="CPUs per trial (default: 1)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions pack trials (default: 0.25 with GPUs, else 0)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials at once (default: as many as resources allow; for an Optuna search 4, so TPE learns "
                        "from finished trials before it draws the rest)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"epochs between checkpoints; the last epoch always checkpoints (default: {d.checkpoint_every})")
    p.add_argument("--max-failures", type=int, default=d.max_failures, help="retries of a failed trial (default: 2)")
    p.add_argument("--reuse-actors", action=argparse.BooleanOptionalAction, default=d.reuse_actors,
                   help="run a node's trials one after another in the same worker processes, which saves each trial "
                        "its imports and process start (default: on)")
    p.add_argument("--save-weights", action=argparse.BooleanOptionalAction, default=d.save_weights,
                   help="keep each finished trial's best weights in MLflow (model/weights.pt: about 12.6 MB per MLP "
                        "trial, 0.5 MB per CNN trial; default: on)")
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted sweep (or --sweep-id)")
    p.add_argument("--sweep-id", help="with --resume: which sweep to continue")
    p.add_argument("--num-gpus", type=int,
                   help="logical GPUs of a local Ray instance; lets a CPU machine rehearse GPU packing (default: detected)")
    p.add_argument("--verbose", type=int, default=d.verbose, choices=(0, 1, 2), help="Ray's progress output (default: 1)")


def build_parser() -> Parser:
    from tune.tracking import UI

    parser = Parser(prog="python -m tune", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    train_p = sub.add_parser("train", help="train one config without Ray; prints a JSON line of its best epoch",
                             description="Train one config without Ray. Progress goes to stderr, one line per epoch; "
                                         "the last stdout line is a JSON object with the best epoch's metrics and the config.")
    add_config_options(train_p)
    train_p.add_argument("--threads", type=int, help="torch threads (default: torch's; results are bit-identical only "
                                                     "at the same count, and a sweep trial runs one per CPU)")
    train_p.add_argument("--record", metavar="DIR", help="also write a run record into DIR as the run goes, for "
                                                         "`python -m tune import` (see README: Train anywhere)")
    train_p.add_argument("--experiment", help="with --record: the catalogue experiment the run belongs to")
    train_p.add_argument("--parts", help=argparse.SUPPRESS)  # the study runner: every experiment a shared trial serves
    train_p.add_argument("--smoke-record", action="store_true", help=argparse.SUPPRESS)
    train_p.add_argument("--resume", action="store_true", help="with --record: continue the record's run from its "
                                                               "last saved state")
    train_p.add_argument("--checkpoint-every", type=int, default=10,
                         help="with --record: epochs between saved states, for --resume (default: 10)")
    train_p.set_defaults(run=cmd_train)
    sweep_p = sub.add_parser("sweep", help="run a catalogue experiment as concurrent Ray Tune trials, logged to MLflow",
                             description="Run a catalogue experiment on Ray Tune (locally, or on the cluster at "
                                         "--address / RAY_ADDRESS). Every trial is one MLflow run.")
    add_sweep_options(sweep_p)
    sweep_p.set_defaults(run=cmd_sweep)
    study_p = sub.add_parser("study", help="run a grid experiment's trials as plain processes, one run record each (no "
                                           "Ray, no MLflow), packed onto the GPUs found",
                             description="Run every distinct trial of a catalogue experiment (the ones `sweep` would "
                                         "run, each to its end) as `tune train --record` processes. A second run of "
                                         "the same command skips finished records and continues cut-short ones.")
    study_p.add_argument("experiment", help="catalogue grid experiment (see `list`), e.g. report")
    study_p.add_argument("--record", required=True, metavar="DIR", help="folder for the run records (and their logs)")
    add_trial_list_options(study_p)
    study_p.add_argument("--per-gpu", type=int, default=4, help="trials at once on each GPU (default: 4)")
    study_p.add_argument("--workers", type=int, help="trials at once without GPUs (default: CPUs / --threads)")
    study_p.add_argument("--threads", type=int, default=1, help="torch threads per trial (default: 1, as a sweep trial)")
    study_p.add_argument("--checkpoint-every", type=int, default=10, help="epochs between saved states (default: 10)")
    study_p.add_argument("--limit-trials", type=int, help="only the first N trials (for trying it out)")
    study_p.set_defaults(run=cmd_study)
    import_p = sub.add_parser("import", help="log run records (train --record, study, export) into MLflow as sweep runs",
                              description="Log run records into MLflow with the schema of sweep trials, so `make "
                                          "report` reads them like any sweep. Importing a record twice adds nothing. "
                                          "A damaged record is skipped with one line (exit 2 once the rest are in); "
                                          "a killed run's record is imported up to its last complete epoch.")
    import_p.add_argument("records", nargs="+", metavar="PATH", help="record files, or folders of *.jsonl records")
    import_p.add_argument("--tracking-uri", help=TRACKING_HELP)
    import_p.add_argument("--sweep-id", help="the sweep_id of records that carry none (default: import-DATE-TIME)")
    import_p.add_argument("--experiment", help="the catalogue experiment of records that name none (a lone train run)")
    import_p.set_defaults(run=cmd_import)
    export_p = sub.add_parser("export", help="write a sweep's runs as run records (what docs/study/records holds)")
    export_p.add_argument("--sweep-id", required=True, help="the sweep to export")
    export_p.add_argument("--out", required=True, metavar="DIR", help="folder for the records")
    export_p.add_argument("--tracking-uri", help=TRACKING_HELP)
    export_p.set_defaults(run=cmd_export)
    for name, help_text, description in (
            ("rerun", "train a logged run again without Ray and check its curves match",
             "Rebuild a run's config from its MLflow params and train it again, at its logged thread count, on data "
             "with its logged digest. Prints train's JSON line with `matched`: whether every logged per-epoch metric "
             "came out the same. Exit 1 when one did not."),
            ("evaluate", "test the weights a finished run kept and check they give its test metrics",
             "Load the best-epoch weights a finished trial kept (model/weights.pt) from any tracking URI, and print "
             "their test loss and accuracy as JSON, with `matched`: whether they equal the run's logged test metrics "
             "(exit 1 if not).")):
        check_run_p = sub.add_parser(name, help=help_text, description=description)
        check_run_p.add_argument("run_id", help="the MLflow run id")
        check_run_p.add_argument("--tracking-uri", help=TRACKING_HELP)
        check_run_p.add_argument("--data", help="the run's data at another place (its digest must match)")
        check_run_p.set_defaults(run=cmd_check_run)
    check_p = sub.add_parser("check-tracking", help="check that runs can be logged to an MLflow store (exit 2 if not)")
    check_p.add_argument("tracking_uri", nargs="?", help="default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    check_p.add_argument("--wait", type=float, default=0, help="seconds to keep asking a server that does not answer yet")
    check_p.set_defaults(run=cmd_check_tracking)
    links_p = sub.add_parser("links", help="print a link to each experiment's runs table in the MLflow UI")
    links_p.add_argument("--tracking-uri", help=TRACKING_HELP)
    links_p.add_argument("--server", help=f"the UI's address (default: the tracking server, else {UI})")
    links_p.set_defaults(run=cmd_links)
    list_p = sub.add_parser("list", help="print the experiment catalogue")
    list_p.set_defaults(run=cmd_list)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
