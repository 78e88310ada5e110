"""Users' own implementations: import a callable named in a config or by `--impl`, check
its signature, and wrap it into an `Impl` of kind `custom` that the sweep runs like the
built-in ones.

Importing a module runs its code: nothing is imported unless a config or a flag names it
(README, "Auditing your own implementation").

The callable has the signature of the built-in implementations (see `losses/base.py`):

    fn(input, target, reduction="mean", **options) -> loss

* ``api: torch`` (default): tensors in, a tensor out, differentiable by autograd;
* ``api: numpy``: numpy arrays in (CPU only; options too), and out either the loss, or
  ``(loss, grad)`` with ``grad`` the gradient of the returned (reduced) loss with respect
  to the input — of the sum of the elements for ``reduction="none"``. Without a gradient
  only the forward is audited.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .config import CustomSpec
from .errors import ConfigError
from .losses import Impl


class ImplementationError(Exception):
    """An implementation returned something unusable (shape, dtype, device, no gradient)."""


class NoGradient(ImplementationError):
    """A numpy implementation returned no gradient: only its forward can be audited."""


def load(spec: CustomSpec, source: str = "<config>") -> Impl:
    """Import `spec.function` and wrap it; an import failure is a config error (exit 2)."""
    fn = _import(spec.function, source, spec.name)
    wrapped = _numpy_adapter(fn, spec.function) if spec.api == "numpy" else _checked(fn, spec.function)
    return Impl(spec.name, "custom", wrapped, summary(spec))


def summary(spec: CustomSpec) -> str:
    return f"{spec.function} (custom, {spec.api})"


# What user code prints goes to stderr, not to stdout, which is bench's and `probe --json`'s:
# Python's print and writes to file descriptor 1 alike. A worker process (worker.py) has fd 1
# on stderr for good and turns this off.
REDIRECT_STDOUT = True


@contextlib.contextmanager
def _quiet():
    if not REDIRECT_STDOUT:
        yield
        return
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 or 2 to speak of: Python-level output only
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _import(function: str, source: str, name: str):
    module_name, attr = function.rsplit(":", 1)
    key = f"custom:{name}"
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(source, key, f"file {module_name!r} not found", "an existing .py file")
            mod_spec = importlib.util.spec_from_file_location(f"losscheck_custom_{path.stem}", path)
            if mod_spec is None or mod_spec.loader is None:  # e.g. a name Python does not load as source
                raise ConfigError(source, key, f"cannot load {module_name!r} as a module", "a .py file")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            # The current directory is searched too, as `python -m` would.
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # the user's module failing to import is a bad input, not a crash
        raise ConfigError(
            source,
            key,
            f"cannot import {module_name!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(
                ": "
            ),
            "an importable module or .py file",
        ) from None
    obj: object = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(
                source, key, f"{module_name!r} has no attribute {attr!r}", "a callable defined in that module"
            )
    if not callable(obj):
        raise ConfigError(
            source,
            key,
            f"{function!r} is a {type(obj).__name__}, not a callable",
            "a function fn(input, target, reduction='mean', **options)",
        )
    return obj


def check_signature(fn, function: str, args: tuple, options: dict) -> None:
    """Raise ImplementationError if `fn` cannot be called as the sweep calls it."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins and C functions: let the call tell
    try:
        sig.bind(*args, **options)
    except TypeError as e:
        passed = ", ".join(["input", "target", "reduction", *(f"{k}=" for k in options)])
        raise ImplementationError(
            f"{function}{sig} cannot be called as fn({passed}): {e}; "
            "expected fn(input, target, reduction='mean', **options)"
        ) from None


def _checked(fn, function):
    # Positional arguments as they come: (input, target, reduction), or a loss's several
    # inputs first (linear_cross_entropy: hidden, classifier; see Loss.custom).
    def call(*args, **options):
        check_signature(fn, function, args, options)
        with _quiet():
            return fn(*args, **options)

    call.__wrapped__ = fn  # type: ignore[attr-defined]  # its signature is the user's (Loss.custom reads it)
    return call


def _to_numpy(v):
    if isinstance(v, torch.Tensor):
        v = v.detach()
        if v.device.type != "cpu":
            raise ImplementationError("numpy implementations run on the CPU only")
        if v.dtype == torch.bfloat16:  # numpy has no bfloat16: its values exactly, in float32
            return v.float().numpy()
        return v.numpy()
    return v


class _NumpyCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, loss, grad):
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0:
            raise NoGradient("the numpy implementation returned no gradient (return (loss, grad) to audit it)")
        u = grad_output
        while u.dim() < grad.dim():
            u = u.unsqueeze(-1)
        return grad * u, None, None


def _numpy_adapter(fn, function):
    def call(x, t, reduction="mean", **options):
        args = (_to_numpy(x), _to_numpy(t), reduction)
        opts = {k: _to_numpy(v) for k, v in options.items()}
        check_signature(fn, function, args, opts)
        with np.errstate(all="ignore"), _quiet():  # NaN and inf are measured, not news for the terminal
            out = fn(*args, **opts)
        grad = None
        if isinstance(out, tuple):
            if len(out) != 2:
                raise ImplementationError(f"returned a tuple of {len(out)}; expected loss or (loss, grad)")
            out, grad = out
        loss = _from_numpy(out, "loss", x)
        g = x.new_empty(0) if grad is None else _from_numpy(grad, "grad", x)
        if grad is not None and g.shape != x.shape:
            raise ImplementationError(f"returned a gradient of shape {tuple(g.shape)}, expected {tuple(x.shape)}")
        return _NumpyCall.apply(x, loss, g) if x.requires_grad else loss

    return call


def _from_numpy(a, what, like: torch.Tensor) -> torch.Tensor:
    if isinstance(a, (float, int, np.floating, np.integer)):
        a = np.asarray(a)
    if not isinstance(a, np.ndarray):
        raise ImplementationError(f"returned {type(a).__name__} as the {what}, not a numpy array")
    if a.dtype.kind != "f":
        raise ImplementationError(f"returned a {a.dtype} {what}, expected floating values")
    want = {torch.bfloat16: np.float32}.get(like.dtype)
    out = torch.from_numpy(a if a.flags.c_contiguous else np.ascontiguousarray(a))
    if want is not None and a.dtype == want:
        return out.to(like.dtype)  # bfloat16 results come back as float32 holding bfloat16 values
    return out
