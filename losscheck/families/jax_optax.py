"""The `jax` family: optax's losses, called as a JAX user calls them (issue 14 item 3).

* ``bce_with_logits``: ``optax.sigmoid_binary_cross_entropy``, times the per-element
  ``weight``; optax has no ``pos_weight`` (those points are skipped, saying so);
* ``cross_entropy`` (and ``sequence_cross_entropy``, on its (batch, time) rows): hard targets
  through ``optax.softmax_cross_entropy_with_integer_labels`` (times ``weight[target]``),
  soft targets and label smoothing through ``optax.softmax_cross_entropy`` on
  ``optax.smooth_labels(targets, ε)`` times the class weights (torch's definition,
  (1 − ε)·q + ε/C weighted per class); ``ignore_index`` as a mask; the mean divides by the
  total weight of the targets kept, as torch does;
* ``focal_loss``: ``optax.sigmoid_focal_loss`` (``alpha=None`` where the point sets none);
  ``softmax_focal_loss``: optax has none (skipped);
* ``bce``: optax has no binary cross entropy on probabilities: its points are skipped.

How it runs: arrays enter JAX in the point's exact dtype (bfloat16 through ml_dtypes, never
widened: optax #1020 only shows in bfloat16), float64 inside ``jax.enable_x64`` (JAX is
float32-only otherwise). The loss is ``jax.jit``-compiled per shape, dtype and reduction; the
gradient is ``jax.vjp`` of the same function in one compiled program (a value-and-grad step),
its cotangent 1 (reduction "none": ones, as the sweep's backward). Every call waits on
``jax.block_until_ready``, so that timing measures the computation and not its dispatch.
Timed: the compiled loss (or loss and vjp) and the copy of its results into torch tensors;
the inputs are converted once per tensor (a JAX user's arrays already live in JAX).

Threads: XLA sizes its CPU thread pool from the CPUs the process may run on, once, when
JAX's backend starts; XLA_FLAGS (`--xla_cpu_multi_thread_eigen=false`,
`intra_op_parallelism_threads`) did not limit it (measured: four busy threads either way,
jax 0.10.2). So the backend is started with the process's CPU affinity narrowed to torch's
thread count (the sweep's ``--threads``) and the affinity put back: one busy thread for
``--threads 1``. A backend started before (JAX used by the user's code in the same process)
keeps its pool; `thread_count()` says which.
"""

from __future__ import annotations

import functools
import os
import weakref

from . import Family, Unsupported

INSTALL = "pip install 'losscheck[jax]'"
_STATE: dict = {}


def thread_count() -> int | None:
    """The size of the CPU thread pool JAX's backend was started with here, None if it was
    started before losscheck first used it (or not at all yet)."""
    return _STATE.get("threads")


def _modules():
    """jax, jax.numpy and optax, imported on first use; the backend started on torch's
    thread count (see the module's docstring)."""
    if "jax" not in _STATE:
        import torch

        # Without it JAX probes for GPU plugins (and warns where a GPU has no CUDA jaxlib).
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax
        import jax.numpy as jnp
        import optax
        from jax._src import xla_bridge

        started = getattr(xla_bridge, "backends_are_initialized", lambda: True)()
        threads = torch.get_num_threads()
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if not started and cpus:
            try:
                os.sched_setaffinity(0, cpus[: max(1, threads)])
                jax.devices("cpu")  # the backend starts now, its pool sized to these CPUs
            finally:
                os.sched_setaffinity(0, cpus)
            _STATE["threads"] = min(max(1, threads), len(cpus))
        _STATE.update(jax=jax, jnp=jnp, optax=optax)
    return _STATE["jax"], _STATE["jnp"], _STATE["optax"]


# ---- the losses, as a JAX user writes them --------------------------------------------------


def _reduce(jnp, loss, reduction: str, denominator=None):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    return jnp.mean(loss) if denominator is None else jnp.sum(loss) / denominator


def _bce_with_logits(jnp, optax, x, y, reduction, weight=None):
    loss = optax.sigmoid_binary_cross_entropy(x, y)
    if weight is not None:
        loss = loss * weight
    return _reduce(jnp, loss, reduction)


def _cross_entropy(
    jnp,
    optax,
    x,
    t,
    reduction,
    weight=None,
    label_smoothing=0.0,
    ignore_index=None,
    z_loss=0.0,
    softcap=0.0,
    smoothing_convention="alpha_over_k",
):
    import jax

    # Language-model options as JAX training code writes them (issue 18): Gemma's
    # `cap * jnp.tanh(x / cap)` on every logit, `z_loss * logsumexp(x) ** 2` per kept row
    # (ε = α·V/(V − 1) for the Megatron convention: losses/cross_entropy_lm.py).
    if smoothing_convention != "alpha_over_k" and label_smoothing:
        label_smoothing = label_smoothing * x.shape[-1] / (x.shape[-1] - 1)
    if softcap:
        x = softcap * jnp.tanh(x / softcap)
    if z_loss:
        plain = _cross_entropy(jnp, optax, x, t, "none", weight, label_smoothing, ignore_index)
        z = z_loss * jax.nn.logsumexp(x, axis=-1) ** 2
        soft = jnp.issubdtype(t.dtype, jnp.floating)
        keep = None if soft or ignore_index is None else t != ignore_index
        if weight is None or soft:
            share = jnp.ones(z.shape, x.dtype)
        else:
            share = weight[t if keep is None else jnp.where(keep, t, 0)]
        if keep is not None:
            z, share = jnp.where(keep, z, 0), jnp.where(keep, share, 0)
        denominator = None if (keep is None and (weight is None or soft)) else jnp.sum(share)
        return _reduce(jnp, plain + z, reduction, denominator)
    if jnp.issubdtype(t.dtype, jnp.floating):  # soft targets: the mean is over rows
        q = optax.smooth_labels(t, label_smoothing) if label_smoothing else t
        return _reduce(jnp, optax.softmax_cross_entropy(x, q if weight is None else q * weight), reduction)
    keep = None if ignore_index is None else t != ignore_index
    labels = t if keep is None else jnp.where(keep, t, 0)
    if label_smoothing:
        q = optax.smooth_labels(jax.nn.one_hot(labels, x.shape[-1], dtype=x.dtype), label_smoothing)
        loss = optax.softmax_cross_entropy(x, q if weight is None else q * weight)
    else:
        loss = optax.softmax_cross_entropy_with_integer_labels(x, labels)
        if weight is not None:
            loss = loss * weight[labels]
    share = jnp.ones(loss.shape, x.dtype) if weight is None else weight[labels]
    if keep is not None:
        loss, share = jnp.where(keep, loss, 0), jnp.where(keep, share, 0)
    return _reduce(jnp, loss, reduction, None if keep is None and weight is None else jnp.sum(share))


def _focal(jnp, optax, x, y, reduction, weight=None, gamma=2.0, alpha=-1.0):
    return _reduce(jnp, optax.sigmoid_focal_loss(x, y, alpha=None if alpha < 0 else alpha, gamma=gamma), reduction)


_STATICS = ("label_smoothing", "ignore_index", "gamma", "alpha")  # options that are numbers: compiled in


@functools.cache
def _compiled(multiclass: bool | None, reduction: str, statics: tuple, with_grad: bool):
    """The jitted loss (with_grad: loss and its vjp in one program) for these static options."""
    jax, jnp, optax = _modules()
    body = _cross_entropy if multiclass else _bce_with_logits
    if multiclass is None:  # focal_loss (see provide)
        body = _focal

    def loss(x, t, weight):
        return body(jnp, optax, x, t, reduction, weight, **dict(statics))

    if not with_grad:
        return jax.jit(loss)

    def loss_and_grad(x, t, weight):
        value, vjp = jax.vjp(lambda x: loss(x, t, weight), x)
        (grad,) = vjp(jnp.ones_like(value))
        return value, grad

    return jax.jit(loss_and_grad)


# ---- the torch-facing implementation --------------------------------------------------------


class _Arrays:
    """Tensors converted to JAX arrays once each (the sweep calls an implementation many
    times on the same tensors while timing it): keyed by the tensor object, valid while it
    lives and is not written to (its version counter)."""

    def __init__(self, size: int = 4):  # input, its requires-grad view, target, weight
        self.size = size
        self.entries: dict[int, tuple] = {}

    def get(self, jnp, t):
        from .. import arrays

        entry = self.entries.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == t._version:
            return entry[2]
        a = arrays.to_numpy(t)  # the exact dtype (bfloat16: ml_dtypes')
        if a.dtype.kind == "i":
            a = a.astype("int32")  # class indices: JAX's default integer width
        array = jnp.asarray(a)
        # Copies of tensors that are gone are dropped: the cache holds no point but the live ones.
        self.entries = {k: e for k, e in self.entries.items() if e[0]() is not None}
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[id(t)] = (weakref.ref(t), t._version, array)
        return array


class OptaxLoss:
    """One loss of the family, called as losses/base.py's implementations are."""

    def __init__(self, multiclass: bool | None):
        self.multiclass = multiclass
        self.arrays = _Arrays()

    def __call__(self, x, target, reduction="mean", **options):
        import numpy as np
        import torch

        from .. import arrays

        if x.device.type != "cpu":
            raise Unsupported(f"the jax family runs on the CPU (jax[cpu]), not on {x.device.type}")
        if "pos_weight" in options:
            raise Unsupported("optax's sigmoid_binary_cross_entropy has no pos_weight")
        jax, jnp, _ = _modules()
        dtype = arrays.numpy_dtype(x.dtype)
        with_grad = x.requires_grad and torch.is_grad_enabled()
        if options.get("shard_mistake", "none") != "none":
            raise Unsupported("shard_mistake is a mistake of the naive transcription; optax makes none")
        # `shards`: optax's loss of the gathered logits, which are the input itself.
        kept = (*_STATICS, "z_loss", "softcap", "smoothing_convention")
        statics = tuple(sorted((k, v) for k, v in options.items() if k in kept))
        with jax.enable_x64(x.dtype == torch.float64):
            weight = options.get("weight")
            args = [self.arrays.get(jnp, v) for v in (x, target)]
            args.append(None if weight is None else self.arrays.get(jnp, weight))
            out = jax.block_until_ready(_compiled(self.multiclass, reduction, statics, with_grad)(*args))
        value, grad = out if with_grad else (out, None)
        loss = arrays.from_numpy(np.asarray(value), "loss", dtype)
        if grad is None:
            return loss
        return arrays.WithGradient.apply(x, loss, arrays.from_numpy(np.asarray(grad), "grad", dtype))

    def prepare(self, x, target, reduction, options) -> None:
        """Compile the forward the timing runs (the evaluation compiled the others)."""
        import torch

        with torch.no_grad():
            self(x, target, reduction, **options)


class _Skipped:
    """A loss optax has no function for: its points are skipped, saying so."""

    def __init__(self, reason: str):
        self.reason = reason

    def __call__(self, *args, **kwargs):
        raise Unsupported(self.reason)


# The losses a JAX user computes with optax, by name: a loss added to losscheck later is not
# silently given optax's cross entropy because its input happens to be logits (log_softmax's
# output is a tensor of log-probabilities, not a loss).
_OPTAX = {
    "bce_with_logits": False,
    "cross_entropy": True,
    "sequence_cross_entropy": True,
    "sharded_cross_entropy": True,  # optax's loss of the gathered logits, which are the input itself
    "focal_loss": None,  # optax.sigmoid_focal_loss
}
_NONE = {
    "bce": "optax has no binary cross entropy on probabilities (sigmoid_binary_cross_entropy takes logits)",
    "sigmoid_bce": "optax has no binary cross entropy on probabilities: the sigmoid→BCE chain cannot be "
    "written with it (its with-logits form is bce_with_logits)",
    "nll_loss": "optax has no negative log-likelihood on log-probabilities",
    "log_softmax": "log_softmax is not an optax loss (jax.nn.log_softmax is not audited by this family)",
    "linear_cross_entropy": "optax has no fused linear cross entropy",
    "softmax_focal_loss": "optax has no multi-class focal loss",
}


def provide(loss):
    if loss.name in _OPTAX:
        return OptaxLoss(_OPTAX[loss.name])
    return _Skipped(_NONE.get(loss.name, f"the jax family has no optax function for {loss.name}"))


def describe(loss) -> str:
    if loss.name not in _OPTAX:
        return f"optax: none ({_NONE[loss.name]})" if loss.name in _NONE else "optax: none"
    if loss.name == "focal_loss":
        return "optax.sigmoid_focal_loss, jitted"
    if not loss.multiclass:
        return "optax.sigmoid_binary_cross_entropy, jitted, weights as a JAX user multiplies them"
    return "optax.softmax_cross_entropy(_with_integer_labels), jitted; smoothing, weights, ignore_index by hand"


FAMILY = Family(
    "jax",
    "framework",
    "optax's losses under jax.jit, gradients by jax.vjp (CPU)",
    provide,
    order=50,
    describe=describe,
    requires=("jax", "optax", "ml_dtypes"),
    install=INSTALL,
    devices=("cpu",),
    default=False,
)
