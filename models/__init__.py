"""The study's networks and our own BatchNorm/Dropout layers. Depends on torch only."""

from models.layers import BatchNorm1d, BatchNorm2d, Dropout, Dropout2d
from models.nets import DEFAULT_ORDER, DROPOUT_KINDS, MODELS, TOKENS, build_model, parse_order

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "Dropout", "Dropout2d",
    "DEFAULT_ORDER", "DROPOUT_KINDS", "MODELS", "TOKENS", "build_model", "parse_order",
]
