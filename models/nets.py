"""The study's MLP and CNN, built from a block order.

After its linear or conv layer every block is an ordered list of tokens. The
order is the only way to say which layers exist: leave out `bn` or `dropout`
for the ablations.
"""

from collections import OrderedDict

from torch import nn

from models.layers import BatchNorm1d, BatchNorm2d, Dropout, Dropout2d

TOKENS = ("bn", "relu", "dropout", "pool")
DEFAULT_ORDER = "bn,relu,dropout,pool"
MODELS = ("mlp", "cnn")
DROPOUT_KINDS = ("element", "channel")
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
# The study's MaxPool2d(k=2, stride=2, padding=1): it grows odd sizes, so 32 -> 17 -> 9.
POOL = dict(kernel_size=2, stride=2, padding=1)


def parse_order(order: str, model: str) -> tuple[str, ...]:
    """Return the tokens of `order` for `model`, or raise ValueError naming the fix.

    The MLP has no pooling, so a `pool` token is dropped for it: the default
    order then serves both models.
    """
    tokens = tuple(t.strip().lower() for t in order.split(",") if t.strip())
    unknown = [t for t in tokens if t not in TOKENS]
    if unknown:
        raise ValueError(f"unknown token {unknown[0]!r} in order {order!r}; use tokens from {','.join(TOKENS)}")
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise ValueError(f"token {repeated[0]!r} appears more than once in order {order!r}; use each token at most once")
    if "relu" not in tokens:
        raise ValueError(f"order {order!r} has no 'relu'; every block needs one, e.g. {DEFAULT_ORDER}")
    if model == "cnn" and "pool" not in tokens:
        raise ValueError(f"order {order!r} has no 'pool'; the CNN needs one per block, e.g. {DEFAULT_ORDER}")
    if model == "mlp":
        tokens = tuple(t for t in tokens if t != "pool")
    return tokens


def _block(tokens, width, dropout, dropout_kind, two_d):
    layers = []
    for token in tokens:
        if token == "bn":
            layers.append((token, BatchNorm2d(width) if two_d else BatchNorm1d(width)))
        elif token == "relu":
            layers.append((token, nn.ReLU()))
        elif token == "dropout":
            layers.append((token, Dropout2d(dropout) if dropout_kind == "channel" else Dropout(dropout)))
        elif token == "pool":
            layers.append((token, nn.MaxPool2d(**POOL)))
    return layers


def _pooled(size: int) -> int:
    return (size + 2 * POOL["padding"] - POOL["kernel_size"]) // POOL["stride"] + 1


def build_model(
    model: str = "cnn",
    order: str = DEFAULT_ORDER,
    dropout: float = 0.5,
    dropout_kind: str = "element",
    hidden: int = 1024,
    channels: tuple[int, ...] = (64, 128),
    kernels: tuple[int, ...] = (3, 5),
) -> nn.Sequential:
    """Build the study's MLP or CNN. Raises ValueError on a bad argument."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; use one of {', '.join(MODELS)}")
    if dropout_kind not in DROPOUT_KINDS:
        raise ValueError(f"unknown dropout kind {dropout_kind!r}; use one of {', '.join(DROPOUT_KINDS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout rate {dropout} is outside [0, 1); pick e.g. 0.5")
    tokens = parse_order(order, model)
    c, h, w = IMAGE_SHAPE
    if model == "mlp":
        if dropout_kind == "channel":
            raise ValueError("channel dropout needs feature maps; use dropout_kind=element for the MLP")
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, hidden),
            *(m for _, m in _block(tokens, hidden, dropout, dropout_kind, two_d=False)),
            nn.Linear(hidden, NUM_CLASSES),
        )
    if len(channels) != len(kernels):
        raise ValueError(f"channels {channels} and kernels {kernels} differ in length; give one kernel per conv block")
    blocks = []
    for out_c, k in zip(channels, kernels):
        if k % 2 == 0:
            raise ValueError(f"kernel size {k} is even; 'same' padding needs odd kernels such as 3 or 5")
        layers = [("conv", nn.Conv2d(c, out_c, kernel_size=k, padding=k // 2))]
        layers += _block(tokens, out_c, dropout, dropout_kind, two_d=True)
        blocks.append(nn.Sequential(OrderedDict(layers)))
        c, h, w = out_c, _pooled(h), _pooled(w)
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(c * h * w, NUM_CLASSES))
