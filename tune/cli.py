"""`python -m tune`: train one config, run a sweep, or list the experiment catalogue."""

import argparse
import dataclasses
import json
import math
import sys

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
    from tune import data as datasets
    from tune.train import train

    cfg = config_from_args(args)
    cfg = cfg.replace(data=datasets.resolve(cfg.data))
    dataset = datasets.load(cfg.data, cfg.data_dir)
    print(f"training {cfg.model} (dropout {cfg.dropout}, order {cfg.order}) for {cfg.epochs} epochs on {dataset.source}",
          file=sys.stderr)

    def progress(metrics, _state):
        keys = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds")
        mark = " *" if metrics["improved"] else ""
        print(f"epoch {metrics['epoch']:>3}/{cfg.epochs} " + " ".join(f"{k} {_fmt(metrics[k])}" for k in keys) + mark,
              file=sys.stderr, flush=True)
        return False

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


def add_sweep_options(p: argparse.ArgumentParser) -> None:
    from tune.sweep import SweepArgs

    d = SweepArgs(experiment="")
    p.add_argument("experiment", nargs="?", default=None,
                   help="catalogue experiment (see `list`; default: report; with --resume: the resumed sweep's)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (2,000 training images, 1,000 eval images, 3 epochs)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="repeat every configuration with K seeds (default: 1)")
    p.add_argument("--samples", type=int, default=None, help="trials an Optuna search draws (default: the experiment's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="fix a config field for every trial, e.g. --set epochs=30; mlp.KEY or cnn.KEY for one model")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="replace (or add) one grid axis, e.g. --grid dropout=0.1,0.5,0.9")
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
    p.add_argument("--data", help="dataset for every trial (default: cifar10); see `train --help`")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--storage", default=d.storage,
                   help="results and checkpoints (default: ./ray_results); on a multi-node cluster a shared path or cloud URI")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
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
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted sweep (or --sweep-id)")
    p.add_argument("--sweep-id", help="with --resume: which sweep to continue")
    p.add_argument("--num-gpus", type=int,
                   help="logical GPUs of a local Ray instance; lets a CPU machine rehearse GPU packing (default: detected)")
    p.add_argument("--verbose", type=int, default=d.verbose, choices=(0, 1, 2), help="Ray's progress output (default: 1)")


def build_parser() -> Parser:
    parser = Parser(prog="python -m tune", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    train_p = sub.add_parser("train", help="train one config without Ray; prints a JSON line of its best epoch",
                             description="Train one config without Ray. Progress goes to stderr, one line per epoch; "
                                         "the last stdout line is a JSON object with the best epoch's metrics and the config.")
    add_config_options(train_p)
    train_p.set_defaults(run=cmd_train)
    sweep_p = sub.add_parser("sweep", help="run a catalogue experiment as concurrent Ray Tune trials, logged to MLflow",
                             description="Run a catalogue experiment on Ray Tune (locally, or on the cluster at "
                                         "--address / RAY_ADDRESS). Every trial is one MLflow run.")
    add_sweep_options(sweep_p)
    sweep_p.set_defaults(run=cmd_sweep)
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
