"""The `stable` family: each loss module's own stable implementation."""

from .builtin import own

FAMILY = own("stable", "stable", "the numerically careful formula (log-sum-exp, log1p, xlogy)", 20)
