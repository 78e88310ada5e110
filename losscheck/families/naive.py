"""The `naive` family: each loss module's own naive implementation."""

from .builtin import own

FAMILY = own("naive", "naive", "the textbook formula, literally (exp, divide, log)", 10)
