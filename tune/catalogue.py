"""The experiment catalogue: each entry names its trials (or search space), scheduler and defaults.

Experiments are data. `expand` turns one, plus the user's overrides, into
validated TrialConfigs before Ray starts, so a bad value never reaches a trial.
"""

import itertools
import json
from dataclasses import dataclass, field
from typing import NamedTuple

from models.nets import TOKENS
from tune.config import ConfigError, TrialConfig, UserError

DROPOUT_GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# The study's chosen rates for the ablations and the order experiment.
MLP_RATE, CNN_RATE = 0.8, 0.5
MLP_FULL, CNN_FULL = "bn,relu,dropout", "bn,relu,dropout,pool"
# --smoke: small enough that the `report` experiment runs in minutes on 2 CPU cores.
SMOKE = {"limit": 2000, "eval_limit": 1000, "epochs": 3}
# ASHA wherever dropout varies, chosen by `python -m bench asha-vs-grid` (docs/performance.md): higher
# dropout learns slower and ends best (the MLP: 0.6 at budgets of 20 to 71 epochs, while 0.1
# leads until epoch 10). A shorter grace period keeps the fastest starter, 1.3-2.1 points below
# the winner; half the epochs with rf 2 kept the winner's accuracy in >= 95% of replayed arrival
# orders at 20, 31, 44 and 71 epochs, for 61-84% of the grid's trial-epochs.
SLOW_WINNERS_ASHA = {"grace_fraction": 0.5, "reduction_factor": 2}


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    variants: tuple[dict, ...] = ({},)
    """config overrides, one per variant; crossed with every grid axis"""
    grid: dict = field(default_factory=dict)
    """axis name -> values"""
    search: dict | None = None
    """Optuna search space: name -> ("uniform", lo, hi) | ("loguniform", lo, hi) | ("choice", values)"""
    samples: int = 20
    """trials drawn from `search`"""
    scheduler: str = "asha"
    """asha for searches and rate grids (a trial is ranked against its own group only: this experiment's
    trials of the same model); fifo for comparisons, whose every arm needs the same budget"""
    grace_fraction: float = 0.1
    """ASHA grace period as a fraction of the epochs"""
    reduction_factor: int = 3
    parts: tuple[str, ...] = ()
    """a composite: the experiments it runs together, each under its own scheduler"""
    analysis: str = ""
    """how the report reads it: rates (a dropout-rate grid), ablation (arms with and without `layer`),
    orders (block orders against `reference`), search; empty for a composite"""
    layer: str = ""
    """ablation: the order token whose arms are compared"""
    reference: str = ""
    """orders: the order every other order is compared with"""

    @property
    def members(self) -> tuple["Experiment", ...]:
        """The experiments that run: a composite's parts, or this one."""
        return tuple(get(p) for p in self.parts) if self.parts else (self,)

    def varies(self) -> str:
        if self.parts:
            return " + ".join(self.parts)
        if self.search:
            return ", ".join(f"{k} ({v[0]})" for k, v in self.search.items())
        keys = sorted({k for v in self.variants if len(self.variants) > 1 for k in v} | set(self.grid))
        return ", ".join(keys) or "-"


def _orders(required: tuple[str, ...], optional: tuple[str, ...] = ("bn",)) -> list[str]:
    out = []
    for extra in ((),) + tuple((t,) for t in optional):
        out += [",".join(p) for p in itertools.permutations(required + extra)]
    return out


CATALOGUE = {e.name: e for e in [
    Experiment("dropout-mlp", "MLP over the dropout grid", ({"model": "mlp"},), {"dropout": DROPOUT_GRID},
               analysis="rates", **SLOW_WINNERS_ASHA),
    Experiment("dropout-cnn", "CNN over the dropout grid", ({"model": "cnn"},), {"dropout": DROPOUT_GRID},
               analysis="rates", **SLOW_WINNERS_ASHA),
    Experiment("bn-ablation", "MLP and CNN with and without BatchNorm", (
        {"model": "mlp", "dropout": MLP_RATE, "order": MLP_FULL},
        {"model": "mlp", "dropout": MLP_RATE, "order": "relu,dropout"},
        {"model": "cnn", "dropout": CNN_RATE, "order": CNN_FULL},
        {"model": "cnn", "dropout": CNN_RATE, "order": "relu,dropout,pool"},
    ), scheduler="fifo", analysis="ablation", layer="bn"),
    Experiment("dropout-ablation", "MLP and CNN with and without Dropout", (
        {"model": "mlp", "dropout": MLP_RATE, "order": MLP_FULL},
        {"model": "mlp", "dropout": 0.0, "order": "bn,relu"},
        {"model": "cnn", "dropout": CNN_RATE, "order": CNN_FULL},
        {"model": "cnn", "dropout": 0.0, "order": "bn,relu,pool"},
    ), scheduler="fifo", analysis="ablation", layer="dropout"),
    Experiment("order", "CNN block orders of the study", tuple(
        {"model": "cnn", "dropout": CNN_RATE, "order": o}
        for o in (CNN_FULL, "relu,bn,dropout,pool", "bn,relu,pool,dropout")),
        scheduler="fifo", analysis="orders", reference=CNN_FULL),
    Experiment("order-all", "CNN with every permutation of bn,relu,dropout,pool", tuple(
        {"model": "cnn", "dropout": CNN_RATE, "order": ",".join(p)} for p in itertools.permutations(TOKENS)),
        scheduler="fifo", analysis="orders", reference=CNN_FULL),
    Experiment("dropout-kind", "CNN with element vs channel dropout over the dropout grid",
               ({"model": "cnn"},), {"dropout": DROPOUT_GRID, "dropout_kind": ["element", "channel"]},
               scheduler="fifo", analysis="rates"),
    Experiment("search-mlp", "Optuna TPE over the MLP's dropout, lr and order", ({"model": "mlp"},), search={
        "dropout": ("uniform", 0.0, 0.9), "lr": ("loguniform", 1e-4, 1e-2),
        "order": ("choice", _orders(("relu", "dropout")))}, analysis="search", **SLOW_WINNERS_ASHA),
    Experiment("search-cnn", "Optuna TPE over the CNN's dropout, lr and order", ({"model": "cnn"},), search={
        "dropout": ("uniform", 0.0, 0.9), "lr": ("loguniform", 1e-4, 1e-2),
        "order": ("choice", _orders(("relu", "dropout", "pool")))}, analysis="search", **SLOW_WINNERS_ASHA),
    Experiment("report", "the study: every experiment its report needs", parts=(
        "dropout-mlp", "dropout-cnn", "bn-ablation", "dropout-ablation", "order")),
]}


def group_name(experiment: str, model: str) -> str:
    """A group: the trials of one experiment and one model, the only ones a scheduler ranks together."""
    return f"{experiment}/{model}"


def get(name: str) -> Experiment:
    if name not in CATALOGUE:
        raise UserError(f"unknown experiment {name!r}; choose one of {', '.join(CATALOGUE)} (see `python -m tune list`)")
    return CATALOGUE[name]


def parse_assignments(items: list[str], flag: str) -> dict[str, str]:
    """`key=value` strings into a dict; a key may be scoped to one model as `mlp.key`."""
    names = {f for f in TrialConfig.__dataclass_fields__}
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value.strip():
            raise UserError(f"{flag} {item!r} is not key=value; e.g. {flag} epochs=30")
        if key.split(".")[-1] not in names or key.count(".") > 1 or (
                "." in key and key.split(".")[0] not in ("mlp", "cnn")):
            raise UserError(f"{flag}: unknown config key {key!r}; valid keys are {', '.join(sorted(names))} "
                            f"(optionally scoped as mlp.KEY or cnn.KEY)")
        out[key] = value.strip()
    return out


def apply_overrides(values: dict, overrides: dict) -> dict:
    """`overrides` on top of `values`; a `mlp.KEY` or `cnn.KEY` override applies only to that model."""
    out = dict(values)
    for key, value in overrides.items():
        scope, _, name = key.rpartition(".")
        if not scope or out.get("model", TrialConfig.model) == scope:
            out[name] = value
    return out


class Trial(NamedTuple):
    """One distinct trial of a sweep: its config, and every experiment whose analysis reads it."""

    parts: tuple[str, ...]
    """the experiments it belongs to; the first holds its MLflow run"""
    config: TrialConfig

    @property
    def experiment(self) -> str:
        return self.parts[0]


def expand(name: str, sets: dict | None = None, grids: dict | None = None, seeds: int = 1,
           base: dict | None = None) -> list[Trial]:
    """Every distinct trial a grid experiment runs, validated. Composites expand their parts, and a
    (config, seed) that several parts share is one trial that belongs to all of them: the baseline
    of an ablation is the same run as the grid point it repeats.

    Precedence, low to high: TrialConfig defaults, `base` (e.g. --smoke, --data),
    the experiment's variant and grid, then `sets` and `grids` from the user.
    """
    exp = get(name)
    scoped = {k.split(".")[0] for k in (sets or {}) if "." in k}
    models = {v.get("model", TrialConfig.model) for e in exp.members for v in e.variants}
    if scoped - models:
        raise UserError(f"--set {sorted(scoped - models)[0]}.KEY matches no trial of {name}, whose models are "
                        f"{', '.join(sorted(models))}; drop the scope or fix the model name")
    shared: dict[str, Trial] = {}
    for part in exp.members:
        for cfg in _expand_one(part, sets, grids, seeds, base):
            key = json.dumps(cfg.to_dict(), sort_keys=True)
            held = shared.get(key)
            if held is None:
                shared[key] = Trial((part.name,), cfg)
            elif part.name not in held.parts:
                shared[key] = Trial(held.parts + (part.name,), cfg)
    return list(shared.values())


def _expand_one(exp: Experiment, sets, grids, seeds, base) -> list[TrialConfig]:
    if exp.search:
        raise UserError(f"{exp.name} is a search experiment; it has no fixed grid")
    grid = {**exp.grid, **{k: v.split(",") for k, v in (grids or {}).items()}}
    axes = list(grid)
    configs = []
    for variant in exp.variants:
        for combo in itertools.product(*(grid[a] for a in axes)):
            values = apply_overrides({**(base or {}), **variant, **dict(zip(axes, combo))}, sets or {})
            for seed_offset in range(seeds):
                v = {**values, "seed": int(values.get("seed", 0)) + seed_offset}
                try:
                    configs.append(TrialConfig.from_dict(v))
                except ConfigError as e:
                    raise UserError(f"experiment {exp.name}: {e}") from None
    return configs


def describe() -> list[dict]:
    rows = []
    for exp in CATALOGUE.values():
        trials = f"--samples (default {exp.samples})" if exp.search else str(len(expand(exp.name)))
        description = exp.description
        if exp.parts:
            arms = sum(len(expand(p.name)) for p in exp.members)
            description += f" ({arms} arms; the shared ones are trained once)"
        rows.append({"experiment": exp.name, "trials": trials, "varies": exp.varies(),
                     "scheduler": "each part its own" if exp.parts else scheduler_summary(exp), "description": description})
    return rows


def scheduler_summary(exp: Experiment) -> str:
    if exp.scheduler != "asha":
        return exp.scheduler
    return f"asha (grace {exp.grace_fraction:.0%} of epochs, rf {exp.reduction_factor})"
