"""The `torch` family: each loss module's own torch implementation."""

from .builtin import own

FAMILY = own("torch", "framework", "torch.nn.functional, eager", 30)
