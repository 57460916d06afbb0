"""Small embedded datasets and generators shared by the experiments (no downloads)."""

from meanwise.data.digits import NUM_CLASSES, DigitsSplit, load_digits
from meanwise.data.synthetic_1d import F1, F2, F3, FUNCTIONS, Synthetic1D, get_function

__all__ = [
    "DigitsSplit",
    "load_digits",
    "NUM_CLASSES",
    "Synthetic1D",
    "F1",
    "F2",
    "F3",
    "FUNCTIONS",
    "get_function",
]
