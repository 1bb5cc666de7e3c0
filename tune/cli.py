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


def build_parser() -> Parser:
    parser = Parser(prog="python -m tune", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    train_p = sub.add_parser("train", help="train one config without Ray; prints a JSON line of its best epoch",
                             description="Train one config without Ray. Progress goes to stderr, one line per epoch; "
                                         "the last stdout line is a JSON object with the best epoch's metrics and the config.")
    add_config_options(train_p)
    train_p.set_defaults(run=cmd_train)
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
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
