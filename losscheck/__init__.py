"""losscheck: a benchmark and numerical-stability auditor for loss functions."""

__version__ = "0.1.0"
