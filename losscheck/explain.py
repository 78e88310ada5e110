"""`losscheck explain LOSS`: what a loss is, how it is usually printed, why that breaks,
the stable rewriting and the gradient — with every number computed live.

`explain()` returns plain text (Markdown-ish, readable in a terminal, unicode math). The
numbers in it are not typed in: the dtype limits come from `torch.finfo` and from
evaluating the operations in each dtype (bisection over its representable values), the
spot checks run the loss's implementations on a few inputs against the reference, and the
breakdown scales come from a small losscheck sweep run on the spot (`sweep_mapping`),
analysed with `analysis.breakdown_scales` exactly as a report does.

Per-loss prose lives in `PROSE`, keyed by loss name; a loss without an entry (one added to
`LOSSES` later) is explained from its own `summary`, its implementations' summaries and
its formulas, with the same live numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

# The dtype limits and the per-loss prose (data) live in explain_limits.py and explain_prose.py, the
# live sweep in explain_live.py, the text helpers in explain_text.py.
from . import analysis, explain_text as T, inputs, reference as R
from .dtypes import FORMATS
from .explain_limits import LIMIT_COLUMNS, dtype_limits
from .explain_live import (  # noqa: F401  (E.DISTRIBUTIONS, E.sweep_mapping, ...: explain.<name> for the tests)
    BATCH,
    CLASSES,
    DISTRIBUTIONS,
    SCALES,
    SEED,
    SEQUENCE_BATCH,
    SEQUENCE_LENGTH,
    Live,
    is_sequence,
    run_live,
    sweep_batch,
    sweep_implementations,
    sweep_mapping,
)
from .explain_prose import _BINARY_LOGIT_PROBES, _MULTICLASS_PROBES, _PROBABILITY_PROBES, PROSE, Probe, Prose
from .explain_text import unlatex  # noqa: F401  (E.unlatex for the tests)
from .formats import bits_phrase, capped_bits, counted_in, precision
from .losses import LOSSES, Loss, reference
from .metrics import bits as metric_bits, ulp_distance, ulp_threshold

# The section headers, in order (the tests look for them).
SECTIONS = (
    "1. The loss",
    "2. As usually printed (naive)",
    "3. Why it breaks",
    "4. The stable rewriting",
    "5. The gradient",
)

PROBE_DTYPE = "float32"  # the dtype of the spot checks


# ---- live pieces ---------------------------------------------------------------------------


def _probe_tensors(loss: Loss, probe: Probe, dtype: torch.dtype):
    logits = np.array([probe.logits], dtype=np.float64)
    if not loss.multiclass:
        logits = logits[:, 0]
    return loss.make_input(logits, dtype), loss.make_target(np.array([probe.target]), dtype)


def _judge(value: torch.Tensor, ref: torch.Tensor, threshold_bits: float) -> str:
    v = float(value)
    ulp = float(ulp_distance(value.reshape(1), ref.reshape(1))[0])
    bits = metric_bits(ulp, value.dtype)  # capped at the precision (docs/METRICS.md)
    text = T.fmt_value(v)
    if not math.isfinite(ulp):
        return f"{text} ✗"
    if bits > threshold_bits:
        return f"{text} ✗ ({bits:.1f} bits off)"
    return text


def spot_checks(
    loss: Loss, probes: tuple[Probe, ...], impls: tuple[str, ...], gradient: bool = False, dtype: str = PROBE_DTYPE
) -> str:
    """A table: each probe, the exact value (reference rounded to `dtype`), each implementation.

    `gradient`: the derivative of the loss with respect to the input (the first logit, or
    the probability) instead of the loss. ✗ marks a result non-finite where the reference is
    finite, or more than the dtype's threshold (half its significand bits) off.
    """
    tdtype = FORMATS[dtype].torch_dtype
    threshold = FORMATS[dtype].default_threshold_bits
    rows = []
    for probe in probes:
        inp, target = _probe_tensors(loss, probe, tdtype)
        ref = reference(loss, inp, target)
        exact = ref.grad.reshape(-1) if gradient else ref.loss
        row = [probe.label]
        if loss.input_kind == "probabilities":
            row.append(T.fmt_value(float(inp[0])))
        row.append(T.fmt_value(float(exact[0])))
        for name in impls:
            fn = loss.implementations[name].fn
            try:
                if gradient:
                    x = inp.clone().requires_grad_(True)
                    fn(x, target, "mean").backward()
                    got = x.grad.reshape(-1)
                else:
                    with torch.no_grad():
                        got = fn(inp, target, "none")
                row.append(_judge(got[0], exact[0], threshold))
            except Exception as e:  # an implementation failing is a result
                row.append(f"error: {type(e).__name__}")
        rows.append(row)
    what = "∂ℓ/∂" + ("p" if loss.input_kind == "probabilities" else "x" if not loss.multiclass else "x₀")
    headers = (
        ["input"]
        + (["p"] if loss.input_kind == "probabilities" else [])
        + [f"exact {what}" if gradient else "exact ℓ"]
        + list(impls)
    )
    return T.table(rows, headers)


def _limits_table(dtypes: tuple[str, ...], columns: tuple[str, ...]) -> str:
    rows = []
    for d in dtypes:
        L = dtype_limits(d)
        rows.append([d, str(L.significand_bits), f"{L.max:.4g}"] + [LIMIT_COLUMNS[c][2](L) for c in columns])
    headers = ["dtype", "significand bits", "max"] + [LIMIT_COLUMNS[c][0] for c in columns]
    legend = "\n".join(T.bullet(f"{LIMIT_COLUMNS[c][0]}: {LIMIT_COLUMNS[c][1]}") for c in columns)
    return T.table(rows, headers) + "\n\n" + legend


def breakdown_cell(b: analysis.Breakdown | None) -> str:
    """A breakdown-table cell: '10 (fwd non-finite)', 'none', 'skipped', 'error'."""
    if b is None:
        return "—"
    if b.status != "measured":
        return b.status
    if b.scale is None:
        return "none"
    return f"{b.scale:g} ({b.reason})"


def _breakdown_table(live: Live, loss_name: str, impls: tuple[str, ...], dtypes: tuple[str, ...]) -> str:
    rows, notes = [], []
    for impl in impls:
        row = [impl]
        for d in dtypes:
            b = live.breakdowns.get((loss_name, impl, d, "cpu"))
            row.append(breakdown_cell(b))
            if b is not None and b.status != "measured":
                notes.append(T.bullet(f"{impl}, {d}: {b.status}: {b.reason}"))
        rows.append(row)
    table = T.table(rows, ["implementation"] + list(dtypes))
    return table + ("\n\n" + "\n".join(notes) if notes else "")


def describe_record(record: dict) -> str:
    """What is wrong at one broken point, in words (from its forward/backward numbers)."""
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('message', '')}"
    f, b = record["forward"], record["backward"] or {}
    n = f["n"]
    parts = []
    for key, what in (("nan", "NaN loss"), ("posinf", "+inf loss"), ("neginf", "−inf loss")):
        if f.get(key):
            parts.append(f"{what} in {f[key]}/{n} elements")
    value, ref = f.get("value"), f.get("reference")
    shown_ref = f.get("reference_value", ref)
    ulp = f.get("reduced_ulp")
    if value is not None and ref is not None:
        if not math.isfinite(value) and value != ref:
            parts.append(f"mean loss {T.fmt_value(value)} (reference {T.fmt_value(shown_ref)})")
        elif ulp is not None and ulp > ulp_threshold(counted_in(record)[1]):
            v, r = T.fmt_pair(value, shown_ref)
            p = precision(counted_in(record)[0])
            bits = capped_bits(ulp, counted_in(record)[0])  # never more than p (docs/METRICS.md)
            assert bits is not None, "a finite distance in a known dtype has bits"
            off = "all its bits" if p is not None and bits >= p else f"{bits:.0f} bits"
            parts.append(f"mean off by {off} ({v} vs reference {r})")
    if f.get("saturated") and not parts:
        parts.append(f"{f['saturated']}/{n} losses finite but wrong (silent saturation)")
    if b.get("nan"):
        parts.append(f"NaN in the gradient ({b['nan']}/{b['n']})")
    if b.get("inf"):
        parts.append(f"inf in the gradient ({b['inf']}/{b['n']})")
    return ", ".join(parts) or (analysis.breaks(record) or "")


def _max_logit(
    loss: Loss,
    loss_name: str,
    batch: int,
    classes: int | None,
    scale: float,
    distribution: str,
    seed: int,
    time: int | None = None,
    device: str = "cpu",
) -> float | None:
    """The largest |logit| of a sweep point's inputs (regenerated on its device: they depend
    on the seed and the device only)."""
    try:
        if time:
            return max(
                float(x.abs().max())
                for _, x, _ in inputs.generate_blocks(
                    loss_name, batch, classes, float(scale), distribution, seed, time, device
                )
            )
        logits, _ = inputs.generate(
            loss_name, loss.multiclass, batch, classes, float(scale), distribution, seed, device
        )
        return float(logits.abs().max())
    except Exception:  # a loss whose inputs are made differently, a device absent here: only a hint
        return None


def _where(loss: Loss, r: dict) -> str:
    m = _max_logit(
        loss,
        r["loss"],
        r["batch"],
        r["classes"],
        r["scale"],
        r["distribution"],
        r["seed"],
        r.get("time"),
        r.get("device") or "cpu",
    )
    return r["distribution"] + (f" (|logit| ≤ {m:.3g})" if m is not None else "")


def what_goes_wrong(live: Live, loss: Loss, impls: tuple[str, ...], dtypes: tuple[str, ...]) -> list[str]:
    """Bullets: per implementation and dtype that breaks, what its broken points show."""
    out = []
    for impl in impls:
        for d in dtypes:
            b = live.breakdowns.get((loss.name, impl, d, "cpu"))
            if b is None or b.scale is None:
                continue
            broken = [
                r
                for r in live.records
                if r["impl"] == impl
                and r["dtype"] == d
                and r["scale"] == b.scale
                and r["distribution"] not in analysis.SCALE_FREE
                and analysis.breaks(r)
            ]
            details = "; ".join(f"{_where(loss, r)}: {describe_record(r)}" for r in broken)
            out.append(T.bullet(f"{impl}, {d}, scale {b.scale:g}: {details}"))
    return out


def _misprint_check(loss: Loss, prose: Prose, live: Live) -> str:
    """The source page's misprinted formula against the reference on the sweep's own inputs."""
    dtype = "float64" if "float64" in live.config.dtypes else live.config.dtypes[0]
    tdtype = FORMATS[dtype].torch_dtype
    misprint = prose.misprint
    assert misprint is not None, "called only for a loss whose prose has a misprint"
    fns: tuple[Callable | None, ...] = (
        loss.implementations["naive"].fn if "naive" in loss.implementations else None,
        lambda p, y, _r: misprint(p, y).mean(),
    )
    rows = []
    for scale in SCALES[:4]:
        logits, labels = inputs.generate(loss.name, loss.multiclass, BATCH, None, float(scale), "normal", SEED)
        inp, target = loss.make_input(logits, tdtype), loss.make_target(labels, tdtype)
        ref = reference(loss, inp, target)
        mean_value, mean = ref.mean_value, ref.mean
        assert mean_value is not None and mean is not None, "a mean reduction has a mean"
        row = [f"{scale:g}", T.fmt_value(mean_value)]
        with torch.no_grad():
            for fn in fns:
                if fn is None:
                    row.append("—")
                    continue
                got = fn(inp, target, "mean")
                ulp = float(ulp_distance(got.reshape(1), mean.reshape(1))[0])
                bits = capped_bits(ulp, dtype)
                assert bits is not None, "a sweep dtype has a precision"
                row.append(f"{T.fmt_value(float(got))} ({bits_phrase(bits, dtype)})")
        rows.append(row)
    table = T.table(rows, ["scale", "exact mean", "naive", "as misprinted"])
    return (
        T.para(
            f"Evaluated now on the sweep's own `normal` inputs in {dtype} (batch {BATCH}), the "
            f"misprinted {prose.misprint_label} is wrong already at scale 1, where the correct "
            "formula is exact:"
        )
        + "\n\n"
        + table
    )


def _clamp_demo(loss: Loss) -> str:
    """bce: what a clamp does at p = 1 (evaluated now, float32)."""
    tdtype = torch.float32
    logit = 40.0
    p = loss.make_input(np.array([logit]), tdtype)
    y = loss.make_target(np.array([0]), tdtype)
    lines = [
        f"- logit {logit:g}, y = 0, float32: p = σ(logit) rounds to {T.fmt_value(float(p[0]))}; the true "
        f"loss of the logit is softplus({logit:g}) = {T.fmt_value(float(R.softplus(np.array([logit]))[0]))}."
    ]
    for name in ("torch", "stable", "naive"):
        if name in loss.implementations:
            with torch.no_grad():
                v = float(loss.implementations[name].fn(p, y, "none")[0])
            lines.append(f"- {name} on p: {T.fmt_value(v)}")
    if "bce_with_logits" in LOSSES and "stable" in LOSSES["bce_with_logits"].implementations:
        lg = LOSSES["bce_with_logits"]
        with torch.no_grad():
            v = float(
                lg.implementations["stable"].fn(
                    lg.make_input(np.array([logit]), tdtype), lg.make_target(np.array([0]), tdtype), "none"
                )[0]
            )
        lines.append(f"- bce_with_logits stable on the logit: {T.fmt_value(v)}")
    return (
        "Clamping, evaluated now — a clamped 100 is neither the loss of the rounded p (+inf) nor "
        "that of the logit:\n" + "\n".join(lines)
    )


def _mislabel_demo(loss: Loss) -> str:
    """cross_entropy: autograd shows which gradient the source page's formula is."""
    x = torch.tensor([2.0, 1.0, 0.1], dtype=torch.float64, requires_grad=True)
    t = 0
    p = torch.softmax(x, 0)
    (-torch.log(p[t])).backward()
    pl = p.detach().clone().requires_grad_(True)
    (-torch.log(pl[t])).backward()
    onehot = torch.zeros(3, dtype=torch.float64)
    onehot[t] = 1

    def vec(v):
        return "(" + ", ".join(f"{float(a):.4f}" for a in v) + ")"

    return "\n".join(
        [
            "Evaluated now by autograd, x = (2, 1, 0.1), t = 0:",
            f"- ∂L/∂x = {vec(x.grad)}; softmax(x) − onehot = {vec(p.detach() - onehot)} — the page's formula",
            f"- ∂L/∂p = {vec(pl.grad)} = −onehot/p — what the gradient with respect to the probabilities is",
        ]
    )


_DEMOS: dict[str, Callable[[Loss], str]] = {"clamp": _clamp_demo, "mislabel": _mislabel_demo}


# ---- the explanation ----------------------------------------------------------------------------


def _fallback_prose(loss: Loss) -> Prose:
    """Prose for a loss without an entry in PROSE: its summaries and formulas."""
    impls = loss.implementations
    formulas = getattr(loss, "formulas", None)

    def formula(attr: str) -> str | None:
        text = getattr(formulas, attr, None) if formulas is not None else None
        return unlatex(text) if text else None

    def summary(name: str) -> str:
        return impls[name].summary if name in impls else "(no such implementation)"

    multi = loss.multiclass
    probes = (
        _PROBABILITY_PROBES
        if loss.input_kind == "probabilities"
        else _MULTICLASS_PROBES
        if multi
        else _BINARY_LOGIT_PROBES
    )
    return Prose(
        loss=formula("loss") or loss.summary,
        inputs=loss.input_kind,
        targets="class indices" if multi else "hard 0/1 labels",
        naive=formula("naive") or summary("naive"),
        source=None,
        mechanism=(
            "No hand-written explanation for this loss yet. The usual causes are in the table "
            "below: exp overflowing above ln(max) or underflowing to 0, and σ (or a softmax ratio) "
            "rounding to exactly 1, after which log(1 − σ) or log(ratio) is log 0 or loses every bit "
            "of a small loss. The spot checks and the breakdown scales below are measured.",
        ),
        stable=formula("stable") or summary("stable"),
        stable_why=(f"The `stable` implementation: {summary('stable')}.",),
        gradient=formula("gradient") or "see the stable implementation",
        gradient_how=f"As the `stable` implementation computes it: {summary('stable')}.",
        probes=probes,
    )


def _normal_reach(loss: Loss, loss_name: str) -> str:
    time = SEQUENCE_LENGTH if is_sequence(loss) else None
    k = _max_logit(loss, loss_name, sweep_batch(loss), CLASSES if loss.multiclass else None, 1.0, "normal", SEED, time)
    if k is None:
        return ""
    return (
        f" At scale s the `normal` inputs reach |logit| ≈ {k:.2f}·s (N(0, 1)·s), so "
        f"they cross a limit L from scale L/{k:.2f} on; the largest |logit| of each broken point "
        "is given below."
    )


def known_losses() -> str:
    return ", ".join(LOSSES)


def explain(loss_name: str, dtypes: tuple[str, ...] | None = None, threads: int = 1) -> str:
    """The explanation of `loss_name` (a key of `LOSSES`) as plain text, numbers computed now.

    `dtypes`: the dtypes of the live sweep and the limits table (default: all four);
    `threads`: CPU threads for the sweep. Raises ValueError for an unknown loss or dtype.
    """
    if loss_name not in LOSSES:
        raise ValueError(f"unknown loss {loss_name!r}; known losses: {known_losses()}")
    dtypes = tuple(dtypes) if dtypes else tuple(FORMATS)
    bad = [d for d in dtypes if d not in FORMATS]
    if bad:
        raise ValueError(f"unknown dtype {bad[0]!r}; known dtypes: {', '.join(FORMATS)}")
    loss = LOSSES[loss_name]
    prose = PROSE.get(loss_name) or _fallback_prose(loss)
    impls = sweep_implementations(loss)
    live = run_live(loss_name, dtypes, threads)

    out: list[str] = [f"# losscheck explain {loss_name}", "", T.para(loss.summary + "."), ""]

    # 1. The loss
    out += [
        f"## {SECTIONS[0]}",
        "",
        T.para(prose.loss),
        "",
        T.bullet(f"input: {prose.inputs}"),
        T.bullet(f"targets: {prose.targets}"),
        "",
    ]
    if impls:
        out += ["Implementations measured:"]
        for name in impls:
            impl = loss.implementations[name]
            kind = "" if impl.kind == name else f" ({impl.kind})"
            out.append(T.bullet(f"{name}{kind}: {impl.summary}"))
        out.append("")

    # 2. As usually printed (naive)
    out += [f"## {SECTIONS[1]}", "", T.para(prose.naive), ""]
    if "naive" in loss.implementations:
        out += [T.para(f"losscheck's `naive` transcribes it literally: {loss.implementations['naive'].summary}."), ""]
    if prose.source:
        out += [T.para(prose.source), ""]
    if prose.misprint is not None:
        out += [_misprint_check(loss, prose, live), ""]

    # 3. Why it breaks
    out += [f"## {SECTIONS[2]}", ""]
    out += [T.bullet(m) for m in prose.mechanism]
    out += [
        "",
        "Limits of each dtype, computed now from torch.finfo and by evaluating in the dtype:",
        "",
        _limits_table(dtypes, prose.limit_columns),
        "",
    ]
    if prose.probes:
        try:
            table = spot_checks(loss, prose.probes, impls)
            out += [
                f"Spot checks in {PROBE_DTYPE}, evaluated now (✗: non-finite where the exact value is "
                f"finite, or more than {FORMATS[PROBE_DTYPE].default_threshold_bits:g} bits off):",
                "",
                table,
                "",
            ]
        except Exception as e:  # a loss whose inputs are not shaped like these probes
            out += [f"(spot checks unavailable for this loss: {type(e).__name__}: {e})", ""]
    n_points = len(live.records)
    thresholds = ", ".join(f"{d} {live.config.threshold_bits(d):g}" for d in dtypes)
    shape = (f"{SEQUENCE_BATCH} sequences of {SEQUENCE_LENGTH} tokens" if is_sequence(loss) else f"batch {BATCH}") + (
        f", {CLASSES} classes" if loss.multiclass else ""
    )
    out += [
        T.para(
            f"Breakdown scale, measured now by a losscheck sweep ({n_points} points: scales "
            f"{', '.join(f'{s:g}' for s in SCALES)}; distributions {', '.join(DISTRIBUTIONS)}; "
            f"{shape}; cpu, {threads} thread{'s' if threads != 1 else ''}; {live.seconds:.1f} s):"
        ),
        "",
        _breakdown_table(live, loss_name, impls, dtypes),
        "",
        T.para(
            "The breakdown scale is the smallest swept logit scale at which any point has a "
            "non-finite value (loss, mean or gradient) where the exact value is finite, or a mean "
            f"loss more than half the significand bits off (threshold in bits: {thresholds}); "
            "“none”: it never breaks within the sweep." + _normal_reach(loss, loss_name)
        ),
        "",
    ]
    wrong = what_goes_wrong(live, loss, impls, dtypes)
    if wrong:
        out += ["What goes wrong at the breakdown scale:"] + wrong + [""]
    if "stable" in impls:
        unstable = [
            d
            for d in dtypes
            if (b := live.breakdowns.get((loss_name, "stable", d, "cpu"))) is not None
            and (b.scale is not None or b.status != "measured")
        ]
        if unstable:
            out += [
                T.para(
                    f"NOTE: `stable` does not hold in {', '.join(unstable)} (see the table) — that "
                    "contradicts its design and is worth a bug report."
                ),
                "",
            ]
        else:
            out += [T.para(f"`stable` never breaks in this sweep ({', '.join(dtypes)})."), ""]

    # 4. The stable rewriting
    out += [f"## {SECTIONS[3]}", "", T.para(prose.stable), ""]
    out += [T.bullet(w) for w in prose.stable_why] + [""]
    for name in prose.extras:
        if name == "clamp":
            out += [_DEMOS[name](loss), ""]

    # 5. The gradient
    out += [f"## {SECTIONS[4]}", "", T.para(prose.gradient), "", T.para(prose.gradient_how), ""]
    if prose.gradient_source:
        out += [T.para(prose.gradient_source), ""]
    for name in prose.extras:
        if name == "mislabel":
            out += [_DEMOS[name](loss), ""]
    if prose.probes:
        try:
            table = spot_checks(loss, prose.probes, impls, gradient=True)
            out += [
                f"Gradient spot checks in {PROBE_DTYPE}, by autograd through each implementation "
                "(batch of one), evaluated now:",
                "",
                table,
                "",
            ]
        except Exception as e:
            out += [f"(gradient spot checks unavailable for this loss: {type(e).__name__}: {e})", ""]
    return "\n".join(out).rstrip() + "\n"
