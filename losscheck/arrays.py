"""Exact-dtype conversions between torch tensors and the arrays of foreign code (numpy, and
through numpy JAX): the numpy route of custom implementations (custom.py) and the `jax`
family use them, so that the code audited computes in the point's dtype and nothing else.

bfloat16 is `ml_dtypes.bfloat16` (installed with `losscheck[jax]`); a dtype numpy cannot
hold raises `families.Unsupported` (the point is skipped, saying why), never a conversion
to a wider one: code run in float32 instead of bfloat16 hides exactly the bfloat16 bugs it
is audited for (issue 14: optax's #1020 vanished that way).
"""

from __future__ import annotations

import numpy as np
import torch

from .families import Unsupported


class ImplementationError(Exception):
    """An implementation returned something unusable (shape, dtype, device, no gradient)."""


class NoGradient(ImplementationError):
    """A numpy implementation returned no gradient: only its forward can be audited."""


# numpy's own dtypes for the formats it has; bfloat16 is ml_dtypes' (`numpy_dtype`).
_NUMPY: dict[torch.dtype, np.dtype] = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
}
ML_DTYPES_HINT = "pip install 'losscheck[jax]' (or ml_dtypes)"


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that holds `dtype` exactly, the one a numpy implementation receives
    and must return. Never a wider one: code run in float32 instead of bfloat16 hides the
    very bfloat16 bugs it is audited for (issue 14: optax's #1020 vanished that way).
    Unsupported (the point is skipped, saying why) where numpy cannot represent it."""
    if dtype in _NUMPY:
        return _NUMPY[dtype]
    if dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            raise Unsupported(f"api: numpy needs ml_dtypes for bfloat16 ({ML_DTYPES_HINT})") from None
        return np.dtype(ml_dtypes.bfloat16)
    raise Unsupported(f"api: numpy cannot represent {dtype}; use api: torch")


def to_numpy(v):
    """A tensor's values as a numpy array of the same dtype (bfloat16: ml_dtypes'), sharing
    its memory where numpy can."""
    if not isinstance(v, torch.Tensor):
        return v
    v = v.detach()
    if v.dtype == torch.bfloat16:  # same bits, read as ml_dtypes.bfloat16
        return v.view(torch.int16).numpy().view(numpy_dtype(v.dtype))
    return v.numpy()


class WithGradient(torch.autograd.Function):
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


def _as_array(a, what: str) -> np.ndarray:
    """What a numpy implementation returned, as a numpy array: numpy arrays and scalars, and
    other arrays (JAX, CuPy on the host, torch) through ``__array__`` or DLPack."""
    if isinstance(a, np.ndarray):
        return a
    if isinstance(a, (float, int, np.generic)):
        return np.asarray(a)
    if isinstance(a, torch.Tensor):  # its __array__ refuses bfloat16 and tensors that require grad
        a = a.detach().cpu()
        return to_numpy(a) if a.is_floating_point() else a.numpy()
    try:
        if hasattr(a, "__array__"):
            return np.asarray(a)
        if hasattr(a, "__dlpack__"):
            return np.from_dlpack(a)
    except (TypeError, ValueError, RuntimeError, BufferError) as e:
        raise ImplementationError(f"returned a {type(a).__name__} {what} numpy cannot read: {_first_line(e)}") from None
    raise ImplementationError(
        f"returned {type(a).__name__} as the {what}, not an array: api: numpy expects numpy arrays "
        "(or arrays with __array__ or __dlpack__); use api: torch for code returning tensors"
    )


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__


def from_numpy(a, what: str, dtype: np.dtype) -> torch.Tensor:
    a = _as_array(a, what)
    if a.dtype.kind not in "fV" or (a.dtype.kind == "V" and a.dtype.itemsize != 2):
        raise ImplementationError(f"returned a {a.dtype} {what}, expected floating values")
    if a.dtype != dtype:
        # Never converted: the audit is of the dtype the implementation computes in.
        raise ImplementationError(
            f"returned a {a.dtype} {what} for {dtype} input; api: numpy returns the input's dtype (not converted)"
        )
    if not (a.flags.c_contiguous and a.flags.writeable):
        # torch.from_numpy warns on read-only arrays (JAX's are): a copy, which torch may own.
        a = np.array(a, order="C", copy=True)
    if dtype.kind == "V":  # ml_dtypes.bfloat16: same bits, read as torch.bfloat16
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
