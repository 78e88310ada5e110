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
  only the forward is audited. Arrays arrive in the point's dtype exactly (bfloat16 as
  ``ml_dtypes.bfloat16``, from ``pip install 'losscheck[jax]'``; without it bfloat16 points
  are skipped) and results must come back in it: nothing is converted, so the audit is of
  the precision the code really computes in. Results may be numpy arrays or scalars, or any
  array with ``__array__`` or ``__dlpack__`` (JAX, torch); read-only ones are copied.

Either route may declare keyword parameters it wants told (never passed otherwise, so that
``**options`` receives the point's options only):

* ``loss_name``: the loss it runs as ("bce", "cross_entropy", ...), for one function
  registered for several losses;
* ``need_grad`` (numpy): False when no gradient is wanted (the forward pass, and its
  timing: a function that always computes its gradient has it in its forward time).

A point whose dtype or device the route cannot represent is skipped, saying why
(`families.Unsupported`); an adapter error names the route to use instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .arrays import (  # noqa: F401  (ImplementationError, NoGradient: custom.<name> for worker.py)
    ImplementationError,
    NoGradient,
    WithGradient,
    from_numpy as _from_numpy,
    numpy_dtype,
    to_numpy as _to_numpy,
)
from .config import CustomSpec
from .errors import ConfigError
from .families import Unsupported
from .losses import Impl


def load(spec: CustomSpec, source: str = "<config>") -> Impl:
    """Import `spec.function` and wrap it; an import failure is a config error (exit 2)."""
    fn = _import(spec.function, source, spec.name)
    return Impl(spec.name, "custom", _Adapter(fn, spec.function, spec.api), summary(spec))


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


def _accepts(fn, keyword: str) -> bool:
    """Whether `fn` declares a parameter named `keyword` (not merely **kwargs: options go
    there, and a keyword it did not ask for would reach its code as one)."""
    try:
        return keyword in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class _Adapter:
    """`fn` called as the sweep calls an implementation, through its route (`api`); `loss`:
    the loss it runs as, passed as ``loss_name=`` to a function that declares it."""

    def __init__(self, fn, function: str, api: str, loss: str | None = None):
        self.fn, self.function, self.api, self.loss = fn, function, api, loss
        self.__wrapped__ = fn  # its signature is the user's (inspect.signature; Loss.custom reads it)
        self.extra: dict[str, object] = {"loss_name": loss} if loss is not None and _accepts(fn, "loss_name") else {}
        self.needs_grad = _accepts(fn, "need_grad")

    def bound(self, loss: str) -> _Adapter:
        return _Adapter(self.fn, self.function, self.api, loss)

    def __call__(self, *args, **options):
        # (input, target, reduction), or a loss's several inputs first (linear_cross_entropy:
        # hidden, classifier, target, reduction; see Loss.custom).
        if self.api == "numpy":
            return self._numpy(args, options)
        x, reduction = args[0], (args[-1] if len(args) > 2 else options.get("reduction", "mean"))
        check_signature(self.fn, self.function, args, {**options, **self.extra})
        with _quiet():
            out = self.fn(*args, **options, **self.extra)
        if isinstance(out, torch.Tensor):
            if x.requires_grad and torch.is_grad_enabled() and not out.requires_grad and out.is_floating_point():
                raise ImplementationError(
                    f"reduction={reduction!r} returned a tensor that does not require grad (no autograd graph "
                    "from the input): use api: numpy for code without autograd, returning (loss, grad)"
                )
        elif isinstance(out, (np.ndarray, np.generic, tuple)) or hasattr(out, "__array__"):
            raise ImplementationError(
                f"reduction={reduction!r} returned {type(out).__name__}, not a tensor: "
                "use api: numpy for code that returns numpy arrays (or objects with __array__ or __dlpack__)"
            )
        return out

    def _numpy(self, args: tuple, options: dict):
        x, t, reduction = args[0], args[1], (args[2] if len(args) > 2 else "mean")
        dtype = numpy_dtype(x.dtype)  # Unsupported (the point skipped) where numpy cannot hold it
        if x.device.type != "cpu":
            raise Unsupported(f"api: numpy runs on the CPU only; use api: torch for code that runs on {x.device.type}")
        args = (_to_numpy(x), _to_numpy(t), reduction)
        opts = {k: _to_numpy(v) for k, v in options.items()}
        extra = dict(self.extra)
        if self.needs_grad:  # a function that can skip its gradient is timed forward only too
            extra["need_grad"] = bool(x.requires_grad)
        check_signature(self.fn, self.function, args, {**opts, **extra})
        with np.errstate(all="ignore"), _quiet():  # NaN and inf are measured, not news for the terminal
            out = self.fn(*args, **opts, **extra)
        grad = None
        if isinstance(out, tuple):
            if len(out) != 2:
                raise ImplementationError(f"returned a tuple of {len(out)}; expected loss or (loss, grad)")
            out, grad = out
        loss = _from_numpy(out, "loss", dtype)
        g = x.new_empty(0) if grad is None else _from_numpy(grad, "grad", dtype)
        if grad is not None and g.shape != x.shape:
            raise ImplementationError(f"returned a gradient of shape {tuple(g.shape)}, expected {tuple(x.shape)}")
        return WithGradient.apply(x, loss, g) if x.requires_grad else loss


def for_loss(impl: Impl, loss: str) -> Impl:
    """`impl` (from `load`) as an implementation of `loss`: a function that declares a
    ``loss_name`` parameter is told it."""
    fn = impl.fn
    return dataclasses.replace(impl, fn=fn.bound(loss)) if isinstance(fn, _Adapter) else impl
