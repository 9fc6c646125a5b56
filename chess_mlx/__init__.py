"""CHESS activation-sparse decoding for MLX models."""

__version__ = "0.1.0"

from .sparsify import METHODS, sparsify, unsparsify, track_sparsity
from .thresholds import Thresholds, load_thresholds
from .utils import load

__all__ = [
    "METHODS",
    "Thresholds",
    "load",
    "load_thresholds",
    "sparsify",
    "track_sparsity",
    "unsparsify",
]
