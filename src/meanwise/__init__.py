"""meanwise: nine published ways to average, as drop-in PyTorch components."""

__version__ = "0.1.0"
