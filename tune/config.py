"""The one trial config: every knob of a single training run, validated once.

Each field's docstring is its `--help` text; tune/cli.py parses the class
straight into the command line, and Ray trials validate their config dicts
through `TrialConfig.from_dict`.
"""

import ast
import dataclasses
import hashlib
import inspect
import json
import textwrap
from dataclasses import dataclass

from models.nets import DEFAULT_ORDER, DROPOUT_KINDS, MODELS, parse_order

NORMALIZE = ("center", "standardize")
SELECT_BY = ("val_loss", "val_acc")
DEVICES = ("auto", "cpu", "cuda")
AMP = ("off", "bf16")


class UserError(Exception):
    """A problem the user can fix: the CLI prints it as one line and exits 2."""


class ConfigError(UserError):
    """A config field has a bad value. The message names the field and the fix."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class TrialConfig:
    model: str = "mlp"
    """network: mlp (Linear 3072->hidden->10) or cnn (two conv blocks, then Linear)"""
    dropout: float = 0.5
    """dropout rate in [0, 1); 0 makes the dropout layer the identity"""
    dropout_kind: str = "element"
    """element (Dropout: single units) or channel (Dropout2d: whole feature maps; cnn only)"""
    order: str = DEFAULT_ORDER
    """layers after each linear/conv layer, in order, from bn,relu,dropout,pool (pool: cnn only,
    ignored by mlp); leave out bn or dropout to ablate it"""
    hidden: int = 1024
    """mlp hidden units"""
    channels: str = "64,128"
    """cnn output channels per conv block, comma-separated"""
    kernels: str = "3,5"
    """cnn kernel size per conv block (odd; padding is kernel//2), comma-separated"""
    lr: float = 1e-3
    """Adam learning rate"""
    batch_size: int = 100
    """training images per step"""
    epochs: int = 100
    """training epochs (an epoch is one pass over the training split)"""
    seed: int = 0
    """seed of weights, dropout masks and data order; same config + seed = same metrics on the CPU"""
    data: str = "cifar10"
    """dataset: cifar10 (torchvision, downloaded if missing), imagefolder:PATH (folder or .tar.gz with
    train/<class>/ and test/<class>/), or synthetic"""
    data_dir: str = "./data"
    """where cifar10 is downloaded and decoded datasets are cached"""
    limit: int = 0
    """training images to use, 0 for all (smoke runs)"""
    eval_limit: int = 0
    """validation and test images to use each, 0 for all (smoke runs)"""
    val_size: int = 10000
    """validation images, taken from the end of the (fixed-seed shuffled) training set; at most a fifth of it"""
    normalize: str = "center"
    """center: (x - 128) / 255, as in the study; standardize: per-channel mean/std of the training split"""
    select_by: str = "val_loss"
    """best epoch by val_loss (minimum) or val_acc (maximum); ties go to the later epoch"""
    patience: int = 0
    """stop after this many epochs without improvement; 0 disables early stopping"""
    device: str = "auto"
    """auto (cuda when present), cpu or cuda"""
    amp: str = "off"
    """off (fp32) or bf16 (CUDA autocast; BatchNorm statistics stay fp32)"""
    channels_last: bool = False
    """CUDA: store cnn activations channels-last for faster convolutions"""
    compile: bool = False
    """compile the model with torch.compile"""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        self._check_choice("model", MODELS)
        self._check_choice("dropout_kind", DROPOUT_KINDS)
        self._check_choice("normalize", NORMALIZE)
        self._check_choice("select_by", SELECT_BY)
        self._check_choice("device", DEVICES)
        self._check_choice("amp", AMP)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"{self.dropout} is outside [0, 1); use a rate such as 0.5")
        if self.dropout_kind == "channel" and self.model == "mlp":
            raise ConfigError("dropout_kind", "channel dropout needs feature maps; use element for the mlp")
        try:
            tokens = parse_order(self.order, self.model)
        except ValueError as e:
            raise ConfigError("order", str(e)) from None
        object.__setattr__(self, "order", ",".join(tokens))
        for name in ("hidden", "batch_size", "epochs", "lr", "val_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"{getattr(self, name)} must be positive")
        for name in ("limit", "eval_limit", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"{getattr(self, name)} must be 0 (off) or positive")
        channels, kernels = self.conv_channels, self.conv_kernels
        if len(channels) != len(kernels) or not channels:
            raise ConfigError("kernels", f"give one kernel per conv block: {len(channels)} channels, {len(kernels)} kernels")
        if any(c <= 0 for c in channels):
            raise ConfigError("channels", f"{self.channels!r} must be positive integers")
        if any(k <= 0 or k % 2 == 0 for k in kernels):
            raise ConfigError("kernels", f"{self.kernels!r} must be odd positive integers such as 3,5")
        if not self.data.strip():
            raise ConfigError("data", "is empty; use cifar10, imagefolder:PATH or synthetic")

    def _check_choice(self, name, choices):
        if getattr(self, name) not in choices:
            raise ConfigError(name, f"unknown value {getattr(self, name)!r}; use one of {', '.join(choices)}")

    @property
    def conv_channels(self) -> tuple[int, ...]:
        return _int_list("channels", self.channels)

    @property
    def conv_kernels(self) -> tuple[int, ...]:
        return _int_list("kernels", self.kernels)

    @classmethod
    def from_dict(cls, values: dict) -> "TrialConfig":
        """Validate a plain dict (from Ray, JSON or MLflow params) into a config."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(unknown[0], f"unknown config key; valid keys are {', '.join(sorted(names))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrialConfig":
        return dataclasses.replace(self, **changes)

    def has_layer(self, token: str) -> bool:
        return has_layer(self.order, token, self.dropout)

    def key(self) -> str:
        """A stable hash of the config without its seed: the seeds of one configuration share it."""
        values = {k: v for k, v in self.to_dict().items() if k != "seed"}
        return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def improves(value: float, best: float, mode: str) -> bool:
    """The best-epoch rule: a value at least as good as the best so far wins, so ties go to the later epoch."""
    return value <= best if mode == "min" else value >= best


def best_index(values, mode: str = "min") -> int:
    """The index of the best value by `improves`, scanning in epoch order."""
    best, at = None, -1
    for i, v in enumerate(values):
        if best is None or improves(v, best, mode):
            best, at = v, i
    return at


def has_layer(order: str, token: str, dropout: float) -> bool:
    """Whether a network has the layer: its token is in the order, and for dropout the rate is above 0
    (a rate of 0 makes the dropout layer the identity)."""
    return token in order.split(",") and (token != "dropout" or dropout > 0)


def _int_list(name: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(name, f"{text!r} is not a comma-separated list of integers") from None


def _coerce(f: dataclasses.Field, value):
    """Turn a value (maybe a string from the CLI or MLflow) into the field's type."""
    kind = type(f.default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if kind is int:
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f.name, f"{value!r} is not a valid {kind.__name__}") from None


def field_help() -> dict[str, str]:
    """Each field's docstring: the string literal right below it in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(TrialConfig)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs
