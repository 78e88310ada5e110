"""The prose of `explain`, per loss: data (what the loss is, how it is usually printed, why
that breaks, the stable form, the gradient, the pages it comes from), kept apart from the
code that measures and prints it (explain.py). Every number in the text is measured live
there; nothing here is a measured value."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .explain_limits import DEFAULT_LIMIT_COLUMNS


@dataclass(frozen=True)
class Probe:
    """A spot-check input: logits (one row) and a target, as for the sweep."""

    label: str
    logits: tuple[float, ...]  # one logit (binary losses) or C logits (multi-class)
    target: int


@dataclass(frozen=True)
class Prose:
    loss: str
    inputs: str
    targets: str
    naive: str
    source: str | None
    mechanism: tuple[str, ...]  # bullets
    stable: str
    stable_why: tuple[str, ...]
    gradient: str
    gradient_how: str
    gradient_source: str | None = None
    limit_columns: tuple[str, ...] = DEFAULT_LIMIT_COLUMNS
    probes: tuple[Probe, ...] = ()
    # The source page's misprinted formula, per element, for a live "formula error" check.
    misprint: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    misprint_label: str = ""
    extras: tuple[str, ...] = field(default=())  # names of live demos (see _DEMOS)


_BINARY_LOGIT_PROBES = (
    Probe("confident correct, x = 20, y = 1", (20.0,), 1),
    Probe("confident correct, x = −20, y = 0", (-20.0,), 0),
    Probe("confident wrong, x = 20, y = 0", (20.0,), 0),
    Probe("confident wrong, x = −100, y = 1", (-100.0,), 1),
    Probe("confident correct, x = −100, y = 0", (-100.0,), 0),
    Probe("moderate, x = 3, y = 0", (3.0,), 0),
)
_PROBABILITY_PROBES = (
    Probe("confident correct, logit 20, y = 1", (20.0,), 1),
    Probe("confident correct, logit −20, y = 0", (-20.0,), 0),
    Probe("confident wrong, logit 20, y = 0", (20.0,), 0),
    Probe("confident correct, logit −200, y = 0", (-200.0,), 0),
    Probe("moderate, logit 3, y = 0", (3.0,), 0),
)
_MULTICLASS_PROBES = (
    Probe("confident correct, x = (30, 0, 0), t = 0", (30.0, 0.0, 0.0), 0),
    Probe("confident correct, x = (10, 0, 0), t = 0", (10.0, 0.0, 0.0), 0),
    Probe("large logits, x = (100, 0, 0), t = 1", (100.0, 0.0, 0.0), 1),
    Probe("large logits, x = (100, 0, 0), t = 0", (100.0, 0.0, 0.0), 0),
    Probe("target far below, x = (−110, 0, 0), t = 0", (-110.0, 0.0, 0.0), 0),
    Probe("moderate, x = (2, 1, 0.1), t = 1", (2.0, 1.0, 0.1), 1),
)


def _bce_misprint(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # −(1/N) Σᵢ yᵢ·log ŷᵢ + (1 − yᵢ)·log(1 − ŷᵢ), per element: the bracket is missing.
    return -y * torch.log(p) + (1 - y) * torch.log(1 - p)


PROSE: dict[str, Prose] = {
    "bce_with_logits": Prose(
        loss="ℓ(x, y) = −[y·log σ(x) + (1−y)·log(1−σ(x))],  σ(x) = 1/(1 + e^−x);  "
        "equivalently ℓ = log(1 + e^x) − x·y.  The mean loss is (1/N)·Σᵢ ℓ(xᵢ, yᵢ).",
        inputs="logits x (any real number; ±inf where masked)",
        targets="hard 0/1 labels y",
        naive="σ = 1/(1 + exp(−x));  ℓ = −[y·log σ + (1−y)·log(1−σ)];  mean = (Σᵢ ℓᵢ)/N, summed in the dtype.",
        source="Page “BCEWithLogitsLoss 的具体数学公式” prints ℓ(x, y) = −(1/N) Σᵢ [yᵢ·log σ(xᵢ) + (1 − yᵢ)·"
        "log(1 − σ(xᵢ))] and rightly says it takes the linear output, no sigmoid first. That is "
        "correct as mathematics; transcribed literally it is exactly the naive form above — "
        "unstable, not wrong.",
        mechanism=(
            "Large positive x: 1 + exp(−x) rounds to 1, so σ(x) is exactly 1 from the column "
            "“σ = 1 from” below, and 1 − σ(x) = 0. With y = 0 the loss is −log 0 = +inf where the true "
            "loss is ≈ x; with y = 1 it is −[log 1 + 0·log 0] = −(0·(−inf)) = NaN where the true loss "
            "is a tiny e^−x. Before that, 1 − σ(x) cancels: only the few bits of e^−x that σ kept "
            "survive, so the loss of a wrong prediction drifts off before anything is infinite.",
            "Large negative x: exp(−x) overflows to inf for x < −ln(max) (column “ln(max)”), "
            "σ = 1/inf = 0 and log σ = −inf: +inf loss with y = 1 (true loss ≈ |x|), NaN with y = 0.",
            "The gradient through autograd multiplies (1−y) = 0 by −1/(1−σ) = −inf: one confident "
            "correct prediction makes the whole gradient of the mean NaN.",
            "torch's fused kernel never overflows, but (spot checks below) it does not keep the tiny "
            "loss of every confident correct prediction: a batch of them can have a mean loss off by "
            "most of its bits — finite and silent.",
        ),
        stable="ℓ = max(x, 0) − x·y + log1p(e^−|x|)",
        stable_why=(
            "e^−|x| ≤ 1 never overflows, and log1p keeps every bit of a tiny e^−|x| "
            "(log1p(2e−9) = 2e−9 where log(1 + 2e−9) = 0 in float32).",
            "For hard targets max(x, 0) − x·y is max(z, 0) with z = x (y = 0) or −x (y = 1): nothing "
            "cancels, and ±inf logits give the limits (0 on the target's side, +inf on the wrong "
            "side) instead of inf·0 = NaN.",
            "losscheck's `stable` also computes one precision up (float32 for half precision, float64 "
            "for float32), rounds once, and accumulates the mean in float64 with each element's "
            "rounding error.",
        ),
        gradient="∂ℓ/∂x = σ(x) − y   (for the mean loss: (σ(xᵢ) − yᵢ)/N)",
        gradient_how="With e = exp(−|x|) and σ(−|x|) = e/(1 + e) (small, and exact to its last bit), "
        "σ(x) − y is formed as (1 − y) − σ(−|x|) for x ≥ 0 and σ(−|x|) − y for x < 0: for "
        "y = 1 and large x that is −e/(1 + e) ≈ −e^−x to full precision, where σ(x) − 1 "
        "would be 1 − 1 = 0. e/(1 + e) rather than 1/(1 + exp(|x|)), which would "
        "overflow to 0 while the true value is still a (subnormal) number.",
        gradient_source="Page “交叉熵损失的反向求导”: with y = σ(a), ∂L/∂a = y − t — correct (its "
        "∂L/∂y = −t/y + (1 − t)/(1 − y) times σ′(a) = y(1 − y)).",
        limit_columns=("log_max", "exp_overflow", "sigmoid_one", "sigmoid_estimate"),
        probes=_BINARY_LOGIT_PROBES,
    ),
    "sigmoid_bce": Prose(
        loss="ℓ(x, y) = −[y·log σ(x) + (1−y)·log(1−σ(x))] = log(1 + e^x) − x·y on logits x: the same loss as "
        "bce_with_logits, written as training code often writes it, F.binary_cross_entropy(x.sigmoid(), y). "
        "The gradient audited is with respect to the logits x.  The mean loss is (1/N)·Σᵢ ℓ(xᵢ, yᵢ).",
        inputs="logits x; the chain rounds p = σ(x) to the dtype before the loss sees it",
        targets="hard 0/1 labels y (soft labels in [0, 1] with `targets: soft`)",
        naive="p = sigmoid(x) in the dtype;  ℓ = −[y·log p + (1−y)·log(1−p)];  mean = (Σᵢ ℓᵢ)/N in the dtype.",
        source="Threads pytorch#103316, keras#9664, Flux.jl#914 and OneFlow#7476 report this chain: "
        "F.binary_cross_entropy(x.sigmoid(), 1) at x = −50 gives dL/dx = −2.41e-11 where the truth is "
        "−1/N; float32 x = 17, y = 0 gives loss 100 and gradient 0 (true 17.00000004 and 0.99999996); "
        "float16 x = 9, y = 0 a NaN gradient. torch's own error under autocast says the same: "
        "“Many models use a sigmoid layer right before the binary cross entropy layer. In this case, "
        "combine the two layers using binary_cross_entropy_with_logits” (pytorch#61098).",
        mechanism=(
            "σ(x) is rounded to the dtype before the loss: from the column “σ = 1 from” on it is exactly "
            "1, and 1 − σ(x) = 0. With y = 0 the true loss is ≈ x, but log(1 − p) = log 0: naive returns "
            "+inf, torch's BCE clamps each log at −100 and returns 100 for every x beyond that column "
            "(silent saturation: 100 at x = 17 in float32 where the truth is 17.00000004).",
            "Before σ is exactly 1, 1 − σ(x) keeps only the bits of e^−x that σ kept: the loss of a "
            "confident wrong prediction drifts off by many bits while still finite.",
            "The gradient is the chain's: dℓ/dp·σ′(x) = (p − y)/(p(1 − p))·p(1 − p). torch's backward "
            "of BCE guards p(1 − p) with an ε, and σ′(x) = p(1 − p) is formed from the rounded p: at "
            "p = 1 it is 0 (gradient 0 where the truth is ≈ 1, float32 x = 17), and in float16, where "
            "the ε (1e-12) itself rounds to 0, 1/0 = inf times σ′ = 0 is NaN (x = 9). For very negative "
            "x with y = 1, (p − 1)/max(p(1 − p), ε) times the tiny σ′ gives −2.41e-11 at x = −50 where "
            "the truth is −1/N (−0.125 for the thread's N = 8; pytorch#103316): all bits lost, silently.",
            "Under torch.autocast on CUDA, torch refuses binary_cross_entropy outright (“unsafe to "
            "autocast”); on the CPU it runs it in float32 — losscheck records both (precision: autocast).",
        ),
        stable="the with-logits form:  ℓ = max(x, 0) − x·y + log1p(e^−|x|)   (never forms σ(x))",
        stable_why=(
            "It is the same loss with σ never rounded: e^−|x| ≤ 1 cannot overflow and log1p keeps a tiny "
            "e^−|x| to its last bit, so the loss of a confident wrong prediction is ≈ |x| to full "
            "precision and a confident correct one keeps its tiny loss.",
            "losscheck's `stable` for sigmoid_bce is bce_with_logits' stable implementation, so the report "
            "sets the chain (torch: x.sigmoid() then BCE) beside the with-logits form per dtype: the "
            "advice “use the with-logits form” measured, not asserted.",
        ),
        gradient="∂ℓ/∂x = σ(x) − y   (for the mean loss: (σ(xᵢ) − yᵢ)/N)",
        gradient_how="As bce_with_logits: σ(x) − y formed as (1 − y) − σ(−|x|) for x ≥ 0 and σ(−|x|) − y for "
        "x < 0, with σ(−|x|) = e/(1 + e), e = exp(−|x|) — no 1 − σ(x) that cancels, no division by "
        "p(1 − p) that the chain's backward needs.",
        gradient_source="pytorch#103316: the chain's gradient at x = −50, y = 1 is −2.41e-11; the exact "
        "σ(−50) − 1 = −(1 − 1.9e-22) per element (divided by N for the mean).",
        limit_columns=("sigmoid_one", "sigmoid_estimate", "log_max", "exp_underflow"),
        probes=_BINARY_LOGIT_PROBES,
    ),
    "bce": Prose(
        loss="ℓ(p, y) = −[y·log p + (1−y)·log(1−p)] on a probability p ∈ [0, 1].  The mean loss is (1/N)·Σᵢ ℓ(pᵢ, yᵢ).",
        inputs="probabilities p = σ(logit), computed in high precision and rounded once to the dtype — "
        "so p is exactly 1 (or 0) beyond the columns “p = 1 from” / “p = 0 at” below",
        targets="hard 0/1 labels y",
        naive="ℓ = −[y·log p + (1−y)·log(1−p)];  mean = (Σᵢ ℓᵢ)/N, summed in the dtype.",
        source="Page “BCEloss 计算原理” first prints −(1/N) Σᵢ yᵢ·log ŷᵢ + (1 − yᵢ)·log(1 − ŷᵢ): the bracket "
        "is missing, so the second term has the wrong sign (it prints the correct "
        "−(1/N) Σᵢ [yᵢ·log ŷᵢ + (1 − yᵢ)·log(1 − ŷᵢ)] later). That is a formula error — wrong "
        "at every scale, in every dtype — which losscheck tells apart from an instability "
        "(right at small scales, broken beyond a threshold). The page also calls the labels "
        "“one-hot encoded”, which does not apply to a single binary probability.",
        mechanism=(
            "Once the logit passes the column “p = 1 from”, p is exactly 1 (or 0 below “p = 0 at”). "
            "With an agreeing target (a confident correct prediction, true loss 0) the naive form is "
            "−[1·log 1 + 0·log 0] = −(0·(−inf)) = NaN. With a disagreeing target the loss of the "
            "rounded p is +inf, and naive's +inf is then exact: the information was lost when the "
            "probability was rounded, which no loss formula can undo (see section 4).",
            "For small p (y = 0), 1 − p rounds to 1 once p < ε/2, and log(1 − p) = 0 where the true "
            "loss is ≈ p: all bits of a small loss lost (spot checks below).",
            "The gradient through autograd multiplies (1−y) = 0 by −1/(1−p) = −inf at p = 1: NaN.",
            "torch's F.binary_cross_entropy clamps each log at −100: at p = 1 with y = 0 it returns "
            "100 where the loss of that p is +inf (and of the logit it came from, about the logit): "
            "finite and wrong — silent saturation, so its mean is off by tens of bits.",
        ),
        stable="ℓ = −[xlogy(y, p) + xlog1py(1 − y, −p)],  no clamp",
        stable_why=(
            "xlogy(0, ·) = 0, so 0·log 0 never makes a NaN; xlog1py(1 − y, −p) = (1 − y)·log1p(−p) keeps "
            "the bits of log(1 − p) for small p. Where p is exactly 0 or 1 and the target disagrees, "
            "the loss of that p is +inf, and that is what it returns.",
            "Clamping is not a fix: it turns +inf into a finite wrong number that nothing downstream "
            "can detect (spot check below). The stable way is to take logits — BCE-with-logits never "
            "forms p (`losscheck explain bce_with_logits`). Page “二分类交叉熵损失函数” is right that "
            "nn.BCEWithLogitsLoss is more stable because it fuses the sigmoid.",
        ),
        gradient="∂ℓ/∂p = −y/p + (1−y)/(1−p) = (p − y)/(p(1 − p))",
        gradient_how="For hard targets one term vanishes: it is computed as (1−y)/(1−p) − y/p with "
        "0/0-free divisions (0 where the numerator is 0) — one division, nothing "
        "subtracted from a nearly equal number; where −1/p overflows but −1/(N·p) of the "
        "mean is finite (p tiny), 1/N is applied first.",
        gradient_source="Page “交叉熵损失的反向求导”: L = −t·log y − (1 − t)·log(1 − y), "
        "∂L/∂y = −t/y + (1 − t)/(1 − y) — correct.",
        limit_columns=("p_one", "p_one_estimate", "p_zero"),
        probes=_PROBABILITY_PROBES,
        misprint=_bce_misprint,
        misprint_label="−y·log p + (1−y)·log(1−p) (bracket missing)",
        extras=("clamp",),
    ),
    "cross_entropy": Prose(
        loss="ℓ(x, t) = −log softmax(x)_t = −log(e^{x_t} / Σⱼ e^{x_j}) = log Σⱼ e^{x_j} − x_t, for "
        "logits x ∈ ℝ^C and the target class t (in one-hot form −Σ_c y_c·log ŷ_c, ŷ = softmax(x)). "
        "The mean loss is (1/N)·Σᵢ ℓ(xᵢ, tᵢ).",
        inputs="logits x, shape (N, C)",
        targets="class indices t ∈ {0, …, C−1}",
        naive="e = exp(x);  ℓ = −log(e_t / Σⱼ e_j);  mean = (Σᵢ ℓᵢ)/N, summed in the dtype.",
        source="Page “nn.CrossEntropyLoss() 数学计算公式” prints L(x, y) = −Σᵢ₌₁ᶜ yᵢ·log ŷᵢ with "
        "ŷ = softmax(x): correct, and the naive form above when transcribed. It names an "
        "F.CrossEntropyLoss() that does not exist (the function is F.cross_entropy, the module "
        "nn.CrossEntropyLoss) and says targets are turned into one-hot internally; with class "
        "indices the loss just picks x_t.",
        mechanism=(
            "exp(x) overflows for x > ln(max) (column “ln(max)”): any such logit makes Σⱼ e_j = inf, "
            "so e_t/Σ = 0 (+inf loss) or, when the target is the large one, inf/inf = NaN — where "
            "the true loss is finite (0 or the margin).",
            "exp(x_t) underflows to 0 below the column “exp = 0 at” (and e_t/Σ long before, "
            "once the ratio is below the smallest subnormal): −log 0 = +inf where the true loss is "
            "≈ max − x_t.",
            "A confident correct prediction: e_t/Σ rounds to exactly 1 once Σ_{j≠t} e^{x_j − x_t} < ε/2 "
            "(with one other logit at a margin of the column “σ = 1 from”; add ln(C−1) for C−1 equal "
            "others), and log gives 0 where the true loss is ≈ Σ_{j≠t} e^{x_j − x_t}: every bit of a "
            "small loss lost — finite and silent. Before that, log of a ratio near 1 keeps only the "
            "bits of the ratio's distance from 1.",
            "The gradient through autograd (of e/Σ) carries the same inf and NaN.",
            "torch's F.cross_entropy (log_softmax: x − logsumexp(x), max-shifted) never overflows, "
            "but logsumexp(x) − x_t cancels when the target is the maximum: a confident correct loss "
            "rounds to 0 (spot checks below), and a batch of them has a mean off by most of its bits.",
        ),
        stable="with m = maxⱼ x_j and k the target if it is a maximum (else an argmax):  "
        "ℓ = (m − x_t) + log1p(s),  s = Σ_{j≠k} e^{x_j − m}",
        stable_why=(
            "Every exponent x_j − m ≤ 0: no overflow. Both terms are ≥ 0: nothing cancels, and "
            "log1p(s) ≈ s keeps a confident correct loss to full precision where "
            "logsumexp(x) − x_t rounds to 0.",
            "losscheck's `stable` computes one precision up, rounds once, accumulates the mean in "
            "float64 with each element's rounding error, and returns the limits at ±inf logits.",
        ),
        gradient="∂ℓ/∂x_j = softmax(x)_j − [j = t], i.e. softmax(x) − onehot(t)   (divided by N for the mean)",
        gradient_how="p_j = e^{x_j − m}/(1 + s) for j ≠ t, and p_t − 1 = −(1 + s − e^{x_t − m})/(1 + s) = "
        "−Σ_{j≠t} p_j: the target's component is a sum of positive terms, not 1 minus a "
        "number close to 1.",
        gradient_source="Page “交叉熵损失的反向求导” writes ∂L/∂y_k = −z_k/y_k (right: the gradient "
        "with respect to the probabilities), then concludes “∂L/∂y_k = y_k − z_k if "
        "k = j, y_k if k ≠ j” — which is the gradient with respect to the logits "
        "(softmax(a) − onehot), mislabelled as with respect to the probabilities y_k.",
        limit_columns=("log_max", "exp_overflow", "exp_underflow", "sigmoid_one", "sigmoid_estimate"),
        probes=_MULTICLASS_PROBES,
        extras=("mislabel",),
    ),
}
