"""The built-in losses as facts that need no torch: names in registry order, summaries,
formulas, the sweep options each supports, and the reductions.

`losses/` builds its `Loss` objects from these, so there is one source for each text;
config validation, reports, findings and the gate read them from here, so that reading
or validating needs no torch (the `losses` package imports torch for the
implementations).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

from . import families

REDUCTIONS = ("none", "mean", "sum")
# The built-in implementations (the families' names), in the order every table, plot and config
# lists them, and those a config without `implementations:` runs. Code that must see a family
# registered later (a test's) asks `families` itself.
BUILTIN_IMPLS = families.names()
DEFAULT_IMPLS = families.defaults()
IGNORE_INDEX = -100  # torch's default ignore_index; ignored targets carry it

# Options a loss may support (`Loss.options`), with the record value that means "not set".
# `spatial`: the d1×d2×… positions of an (N, C, d1, d2, …) input ("none": (N, C)).
OPTION_DEFAULTS = {
    "weight": "none",
    "pos_weight": 1.0,
    "label_smoothing": 0.0,
    "ignored": 0.0,
    "targets": "hard",
    # linear_cross_entropy: the hidden size H, the vocabulary chunks of chunked
    # implementations (0: their own choice), and the dtype of stable's logit GEMMs.
    "hidden": 256,
    "chunks": 0,
    "logits_precision": "float32",
    "precision": "native",
    "spatial": "none",
    "dim": -1,
    # Binary losses: labels per row of an (N, C) multi-label input (1: the flat (N,) input).
    "labels": 1,
    # Language-model training (issue 18; losses/cross_entropy_lm.py, losses/sharded_cross_entropy.py):
    # z-loss λ, tanh softcap (0: none), −inf vocabulary entries (a share < 1 or a count), the
    # label-smoothing convention, vocabulary shards, and a known mistake of sharded code.
    "z_loss": 0.0,
    "softcap": 0.0,
    "masked_vocab": 0.0,
    "smoothing_convention": "alpha_over_k",
    "shards": 1,
    "shard_mistake": "none",
    # kl_div, js_div (losses/kl_div.py): KL's direction, the teacher passed as log-probabilities
    # to the framework's kl_div, the softmax temperature of both distributions.
    "direction": "forward",
    "log_target": False,
    "temperature": 1.0,
    # Focal losses: γ (torchvision's default 2) and α (< 0: no α-weighting, torchvision's convention).
    "gamma": 2.0,
    "alpha": -1.0,
}
SMOOTHING_CONVENTIONS = ("alpha_over_k", "alpha_v_over_v_minus_1")
# linear_cross_entropy's stable: its logit GEMMs as torch's (float32) or exact products summed in float64.
LOGITS_PRECISIONS = ("float32", "float64")
# Mistakes of vocabulary-parallel cross entropy, run by `naive` when a point names one (never by
# default): Megatron-LM #737, the +log(shards) path, #1754, Liger-Kernel #1260.
SHARD_MISTAKES = ("none", "local_smoothing", "log_shards", "uneven_split", "smoothing_formula")
LM_CE_OPTIONS = ("z_loss", "softcap", "masked_vocab", "smoothing_convention")
# How a loss is run on half-precision inputs (precision.py); every loss has the axis.
PRECISIONS = ("native", "autocast", "upcast")
EVERY_LOSS_OPTIONS = ("precision",)


@dataclass(frozen=True)
class Formulas:
    """Text for reports and `explain`: the loss, its literal and its stable forms, its gradient."""

    loss: str
    naive: str
    stable: str
    gradient: str


@dataclass(frozen=True)
class LossInfo:
    name: str
    summary: str
    formulas: Formulas
    # Sweep options this loss supports (keys of OPTION_DEFAULTS).
    options: tuple[str, ...] = ()


_CE_FORMULAS = Formulas(
    loss=r"\ell(x, t) = -\log \frac{e^{x_t}}{\sum_j e^{x_j}}",
    naive=r"\ell = -\log\left(e^{x_t} \big/ \textstyle\sum_j e^{x_j}\right)",
    stable=r"m = \max_j x_j,\ \ell = (m - x_t) + \operatorname{log1p}\Big(\textstyle\sum_{j \ne k} e^{x_j - m}\Big)",
    gradient=r"\partial\ell/\partial x_j = \operatorname{softmax}(x)_j - [j = t]",
)

# In the registry's order (`losses.LOSSES` has the same keys in the same order).
LOSS_INFO: dict[str, LossInfo] = {
    i.name: i
    for i in (
        LossInfo(
            name="bce",
            summary="binary cross entropy on probabilities p = σ(logit) rounded to the dtype, hard 0/1 or soft "
            "targets, per-element weight, pos_weight (one or one per label), (N, C) multi-label inputs",
            formulas=Formulas(
                loss=r"\ell(p, y) = -\left[y \log p + (1-y)\log(1-p)\right]",
                naive=r"\ell = -\left[y\log p + (1-y)\log(1-p)\right]",
                stable=r"\ell = -\left[\operatorname{xlogy}(y, p) + \operatorname{xlog1py}(1-y, -p)\right]",
                gradient=r"\partial\ell/\partial p = \frac{p - y}{p(1-p)}",
            ),
            options=("weight", "pos_weight", "targets", "labels"),
        ),
        LossInfo(
            name="bce_with_logits",
            summary="binary cross entropy from logits, hard 0/1 or soft targets, per-element weight, pos_weight",
            formulas=Formulas(
                loss=r"\ell(x, y) = -\left[y \log \sigma(x) + (1-y)\log(1-\sigma(x))\right]",
                naive=r"\sigma(x) = \frac{1}{1+e^{-x}},\ \ell = -\left[y\log\sigma(x) + (1-y)\log(1-\sigma(x))\right]",
                stable=r"\ell = \max(x,0) - x y + \operatorname{log1p}(e^{-|x|})",
                gradient=r"\partial\ell/\partial x = \sigma(x) - y",
            ),
            options=("weight", "pos_weight", "targets", "labels"),
        ),
        LossInfo(
            name="sigmoid_bce",
            summary="binary cross entropy on sigmoid(logits) as training code writes it "
            "(binary_cross_entropy(x.sigmoid(), y)), gradient with respect to the logits; "
            "per-element weight, pos_weight",
            formulas=Formulas(
                loss=r"\ell(x, y) = -\left[y \log \sigma(x) + (1-y)\log(1-\sigma(x))\right]",
                naive=r"p = \sigma(x)\ \text{in the dtype},\ \ell = -\left[y\log p + (1-y)\log(1-p)\right]",
                stable=r"\ell = \max(x,0) - x y + \operatorname{log1p}(e^{-|x|})",
                gradient=r"\partial\ell/\partial x = \sigma(x) - y",
            ),
            options=("weight", "pos_weight", "targets", "labels"),
        ),
        LossInfo(
            name="cross_entropy",
            summary="softmax cross entropy over `classes`: class-index or soft targets, per-class weight, "
            "label smoothing, ignore_index",
            formulas=_CE_FORMULAS,
            options=("weight", "label_smoothing", "ignored", "targets", "spatial") + LM_CE_OPTIONS,
        ),
        LossInfo(
            name="nll_loss",
            summary="negative log likelihood on log-probabilities (log_softmax of the value set's logits, "
            "rounded once), class-index targets, per-class weight, ignore_index, (N, C, d…) inputs",
            formulas=Formulas(
                loss=r"\ell(x, t) = -w_t\,x_t",
                naive=r"\ell = -w_t x_t,\ \bar\ell = \textstyle\sum_i \ell_i \big/ \sum_i w_{t_i} \text{ in the dtype}",
                stable=r"\bar\ell = \operatorname{round}\Big(\textstyle\sum_i \ell_i \big/ \sum_i w_{t_i}\Big)"
                r" \text{ accumulated wide}",
                gradient=r"\partial\ell/\partial x_j = -w_t\,[j = t]",
            ),
            options=("weight", "ignored", "spatial"),
        ),
        LossInfo(
            name="log_softmax",
            summary="log_softmax along `dim` (-1: rows of (N, C); 0: the same rows as columns of (C, N)), "
            "a tensor output audited element by element, gradient of Σ g·out",
            formulas=Formulas(
                loss=r"y_j = x_j - \log \textstyle\sum_k e^{x_k}",
                naive=r"y_j = x_j - \log\left(\textstyle\sum_k e^{x_k}\right)",
                stable=r"m = \max_k x_k,\ y_j = (x_j - m) - \log \textstyle\sum_k e^{x_k - m}",
                gradient=r"\partial(\textstyle\sum_j g_j y_j)/\partial x_k = g_k - \operatorname{softmax}(x)_k "
                r"\textstyle\sum_j g_j",
            ),
            options=("dim",),
        ),
        LossInfo(
            name="sequence_cross_entropy",
            summary="token cross entropy over (batch, time, vocab = `classes`) with padded sequences "
            "(ignore_index), per-class weight, label smoothing",
            formulas=Formulas(
                loss=r"\ell = \frac{1}{|\{(b,\tau): t_{b\tau} \ne \text{pad}\}|}\sum_{t_{b\tau} \ne \text{pad}} "
                r"-\log \operatorname{softmax}(x_{b\tau})_{t_{b\tau}}",
                naive=_CE_FORMULAS.naive,
                stable=_CE_FORMULAS.stable,
                gradient=_CE_FORMULAS.gradient,
            ),
            options=("weight", "label_smoothing") + LM_CE_OPTIONS,
        ),
        LossInfo(
            name="sharded_cross_entropy",
            summary="vocabulary-parallel (tensor-parallel) cross entropy: the vocabulary split into `shards` "
            "(uneven when they do not divide it), per-shard max, sum of exp, target logit and smoothing term "
            "combined, against the unsharded reference; label smoothing in either convention, ignore_index",
            formulas=Formulas(
                loss=r"\ell = -\log \frac{e^{x_t}}{\sum_{r} \sum_{j \in V_r} e^{x_j}}",
                naive=r"m = \max_r \max_{j \in V_r} x_j,\ S = \sum_r \sum_{j \in V_r} e^{x_j - m},\ "
                r"\ell = \log S - \sum_r [t \in V_r](x_t - m)",
                stable=r"m_r, s_r = \textstyle\sum_{j \in V_r, j \ne k_r} e^{x_j - m_r};\ "
                r"\ell = (m - x_t) + \operatorname{log1p}\big(s_{r^*} + "
                r"\textstyle\sum_{r \ne r^*} (1 + s_r) e^{m_r - m}\big)",
                gradient=_CE_FORMULAS.gradient,
            ),
            options=("label_smoothing", "ignored", "smoothing_convention", "shards", "shard_mistake"),
        ),
        LossInfo(
            name="linear_cross_entropy",
            summary="fused linear cross entropy: hidden states (N, H) times a classifier (V = `classes`, H) "
            "without the N × V logits, gradients for both; label smoothing, ignore_index",
            formulas=Formulas(
                loss=r"z = h W^T,\ \ell(h, W, t) = -\log \frac{e^{z_t}}{\sum_j e^{z_j}}",
                naive=r"z = h W^T \text{ in the dtype},\ "
                r"\ell = -\log\left(e^{z_t} \big/ \textstyle\sum_j e^{z_j}\right)",
                stable=r"\text{per vocabulary chunk: online } m, s = \textstyle\sum_{j \ne k} e^{z_j - m};\ "
                r"\ell = (m - z_t) + \operatorname{log1p}(s)",
                gradient=r"\partial\ell/\partial h = (p - e_t) W,\ \partial\ell/\partial W = (p - e_t)^T h",
            ),
            options=("label_smoothing", "ignored", "hidden", "chunks", "logits_precision"),
        ),
        LossInfo(
            name="token_logprobs",
            summary="token log-probabilities log softmax(x)_t of (N, V = `classes`) logits at the target token, "
            "in nats (DPO/GRPO/PPO); the reference is −cross_entropy's",
            formulas=Formulas(
                loss=r"\ell(x, t) = \log \frac{e^{x_t}}{\sum_j e^{x_j}}",
                naive=r"\ell = \log\left(\operatorname{softmax}(x)\right)_t \text{ in the dtype}",
                stable=r"m = \max_j x_j,\ \ell = (x_t - m) - "
                r"\operatorname{log1p}\Big(\textstyle\sum_{j \ne k} e^{x_j - m}\Big)",
                gradient=r"\partial\ell/\partial x_j = [j = t] - \operatorname{softmax}(x)_j",
            ),
        ),
        LossInfo(
            name="entropy",
            summary="entropy of softmax(x) per row of (N, V = `classes`) logits, in nats (the target is unused)",
            formulas=Formulas(
                loss=r"H(x) = -\textstyle\sum_j p_j \log p_j,\ p = \operatorname{softmax}(x)",
                naive=r"p = \operatorname{softmax}(x),\ H = -\textstyle\sum_j p_j \log p_j \text{ in the dtype}",
                stable=r"m = \max_j x_j,\ H = \operatorname{log1p}(s) + \textstyle\sum_j p_j (m - x_j)",
                gradient=r"\partial H/\partial x_j = p_j \big((m - x_j) - \textstyle\sum_k p_k (m - x_k)\big)",
            ),
        ),
        LossInfo(
            name="kl_div",
            summary="KL divergence of the softmax distributions of a student's and a teacher's logits "
            "(N, V = `classes`), forward or reverse, temperature, log_target; mean over rows (batchmean); "
            "gradients for both",
            formulas=Formulas(
                loss=r"\mathrm{KL}(P \| Q) = \textstyle\sum_j P_j (\log P_j - \log Q_j),\ "
                r"P = \operatorname{softmax}(x^{\mathrm{teacher}}/T),\ "
                r"Q = \operatorname{softmax}(x^{\mathrm{student}}/T)",
                naive=r"\textstyle\sum_j p_j (\log p_j - \log q_j) \text{ in the dtype}",
                stable=r"\delta = \log P - \log Q,\ \mathrm{KL} = \textstyle\sum_j P_j (\delta_j - 1 + e^{-\delta_j})",
                gradient=r"\partial/\partial x^{\mathrm{student}}_j = (Q_j - P_j)/T,\ "
                r"\partial/\partial x^{\mathrm{teacher}}_j = P_j (\delta_j - \mathrm{KL})/T",
            ),
            options=("direction", "log_target", "temperature"),
        ),
        LossInfo(
            name="js_div",
            summary="Jensen-Shannon divergence of the softmax distributions of a student's and a teacher's "
            "logits (N, V = `classes`), temperature; mean over rows; gradients for both",
            formulas=Formulas(
                loss=r"\mathrm{JS} = \tfrac12 \mathrm{KL}(P \| M) + \tfrac12 \mathrm{KL}(Q \| M),\ M = (P + Q)/2",
                naive=r"\tfrac12 \textstyle\sum_j [p_j \log(p_j/m_j) + q_j \log(q_j/m_j)] \text{ in the dtype}",
                stable=r"\tfrac12 \textstyle\sum_j (P_j + Q_j)(\log 2 - H_b(P_j/(P_j + Q_j)))",
                gradient=r"\partial/\partial x^{\mathrm{teacher}}_j = P_j (c_j - \textstyle\sum_k P_k c_k)/T,\ "
                r"c = \tfrac12 \log(2P/(P + Q))",
            ),
            options=("temperature",),
        ),
        LossInfo(
            name="focal_loss",
            summary="binary focal loss from logits as torchvision.ops.sigmoid_focal_loss defines it, hard 0/1 "
            "or soft targets; gamma (γ ≥ 0, 0 and < 1 included), alpha (α-weighting, −1: none)",
            formulas=Formulas(
                loss=r"\ell = -\alpha_t (1-p_t)^\gamma \log p_t,\ p_t = \sigma(x) y + (1-\sigma(x))(1-y)",
                naive=r"p = \frac{1}{1+e^{-x}},\ \ell = -\alpha_t (1-p_t)^\gamma\,"
                r"[y\log p + (1-y)\log(1-p)]",
                stable=r"z = \pm x,\ \ell = \alpha_t\, \sigma(z)^\gamma \operatorname{softplus}(z)",
                gradient=r"\partial\ell/\partial z = \alpha_t \sigma(z)^\gamma\,"
                r"(\gamma\,\sigma(-z)\operatorname{softplus}(z) + \sigma(z))",
            ),
            options=("targets", "gamma", "alpha"),
        ),
        LossInfo(
            name="softmax_focal_loss",
            summary="multi-class focal loss over `classes` from logits and class indices, "
            "−α·(1 − p_t)^γ·log p_t; gamma (γ ≥ 0), alpha (a scalar factor, −1: none)",
            formulas=Formulas(
                loss=r"\ell = -\alpha (1-p_t)^\gamma \log p_t,\ p_t = \operatorname{softmax}(x)_t",
                naive=r"p_t = e^{x_t} \big/ \textstyle\sum_j e^{x_j},\ \ell = -\alpha (1-p_t)^\gamma \log p_t",
                stable=r"z = \log\textstyle\sum_{j \ne t} e^{x_j} - x_t,\ "
                r"\ell = \alpha\, \sigma(z)^\gamma \operatorname{softplus}(z)",
                gradient=r"\partial\ell/\partial x_t = -f'(z),\ \partial\ell/\partial x_j = f'(z)\,"
                r"\frac{e^{x_j}}{\sum_{k \ne t} e^{x_k}}",
            ),
            options=("gamma", "alpha"),
        ),
    )
}


def loss_registry() -> Mapping:
    """The losses by name, in registry order, each with .name, .summary, .formulas, .options:
    `losses.LOSSES` itself once that package is imported (it is the authority: a loss added
    to it at run time counts, as it always did), else LOSS_INFO, the same facts of the
    built-in losses without importing torch."""
    registry = sys.modules.get("losscheck.losses")
    return getattr(registry, "LOSSES", None) or LOSS_INFO
