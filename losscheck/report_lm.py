"""The choices of a language-model trainer, measured (issue 18): a report section that sets two
ways of computing the same thing side by side — reverse KL with the student's probabilities or
with log_target, token log-probabilities by log_softmax + gather or by x_t − logsumexp(x), the
softcap and z-loss as training code writes them or stably, each dtype — and says which one the
run's own records favour. Nothing here is advice the records do not show: a line is written only
where both sides were measured at the same points, and "prefer" only where one side is never
worse there and sometimes better (more NaN/inf elements, or a bit or more lost beyond the other).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .catalog import OPTION_DEFAULTS
from .report_format import dtype_rank, label_dtype

SECTIONS = ("forward", "backward", "backward_teacher")


@dataclass(frozen=True)
class Side:
    impl: str
    # Required option values (a default: unset); the softcap and z-loss lines each hold the other
    # option off, so that one's breakdown is not charged to the other.
    options: tuple[tuple[str, object], ...] = ()
    text: str = ""


@dataclass(frozen=True)
class Choice:
    question: str
    loss: str
    a: Side
    b: Side


CHOICES = (
    Choice(
        "Reverse KL (Soup #719): `F.kl_div` with the student's probabilities as target, or with `log_target`",
        "kl_div",
        Side("torch", (("direction", "reverse"), ("log_target", False)), "probabilities as target"),
        Side("torch", (("direction", "reverse"), ("log_target", True)), "log_target=True"),
    ),
    Choice(
        "Token log-probabilities (TRL #2799, OpenRLHF #718): `log_softmax` then gather, or the "
        "memory-saving x_t − logsumexp(x)",
        "token_logprobs",
        Side("torch", (), "log_softmax + gather"),
        Side("gather_logsumexp", (), "x_t − logsumexp(x)"),
    ),
    Choice(
        "Softcap (Gemma): `cap·tanh(x/cap)` then `F.cross_entropy`, as training code writes it, or stably",
        "cross_entropy",
        Side("torch", (("softcap", 30.0), ("z_loss", 0.0)), "the expression"),
        Side("stable", (("softcap", 30.0), ("z_loss", 0.0)), "stable"),
    ),
    Choice(
        "z-loss (PaLM): `F.cross_entropy + λ·logsumexp(x)²`, or stably",
        "cross_entropy",
        Side("torch", (("z_loss", 0.0001), ("softcap", 0.0)), "the expression"),
        Side("stable", (("z_loss", 0.0001), ("softcap", 0.0)), "stable"),
    ),
)


@dataclass
class _Worst:
    points: int = 0
    nonfinite: int = 0
    bits: float = 0.0
    nats: float | None = None  # the largest finite error in nats
    nats_nonfinite: int = 0  # points whose error in nats is NaN or infinite (a NaN/inf value)

    def add(self, r: dict) -> None:
        self.points += 1
        nonfinite, bits = _judge(r)
        self.nonfinite += nonfinite
        self.bits = max(self.bits, bits)
        nats = (r.get("forward") or {}).get("abs_nats") or {}
        if isinstance(nats.get("max"), (int, float)):
            if math.isfinite(nats["max"]):
                self.nats = max(self.nats or 0.0, float(nats["max"]))
            else:
                self.nats_nonfinite += 1

    def nats_text(self) -> str:
        """'up to X nats' over the finite errors, and how many points had none (a NaN/inf value):
        'up to inf nats' would hide the finite points' error behind the broken ones. Empty where
        no point measured nats."""
        parts = [] if self.nats is None else [f"up to {self.nats:.3g} nats"]
        if self.nats_nonfinite:
            parts.append(f"NaN/inf at {self.nats_nonfinite} of {self.points} points")
        return ", ".join(parts)

    def text(self) -> str:
        nats = self.nats_text()
        nats = f", {nats}" if nats else ""
        bad = f"{self.nonfinite} NaN/inf elements, " if self.nonfinite else ""
        return f"{bad}worst {self.bits:.1f} bits lost{nats} ({self.points} points)"


def _judge(r: dict) -> tuple[int, float]:
    """A record's NaN/inf elements (forward and gradients) and its worst bits lost."""
    nonfinite, bits = 0, 0.0
    for name in SECTIONS:
        s = r.get(name)
        if isinstance(s, dict):
            nonfinite += int(s.get("nan") or 0) + int(s.get("inf") or 0)
            if isinstance(s.get("max_bits"), (int, float)) and not math.isnan(s["max_bits"]):
                bits = max(bits, float(s["max_bits"]))
    return nonfinite, bits


def _matches(r: dict, side: Side) -> bool:
    opts = r.get("options") or {}
    # The report's records are analysis.labelled: a custom implementation's name says "(custom)".
    return r["impl"].removesuffix(" (custom)") == side.impl and all(
        opts.get(k, OPTION_DEFAULTS.get(k)) == v for k, v in side.options
    )


def _point(r: dict, side: Side) -> tuple:
    """What pairs a record of one side with the other side's at the same point: everything but
    the implementation and the options the side fixes."""
    fixed = {k for k, _ in side.options}
    rest = tuple(sorted((k, str(v)) for k, v in (r.get("options") or {}).items() if k not in fixed))
    return (r["dtype"], r["device"], r["batch"], r.get("classes"), r["scale"], r["distribution"],
            r.get("reduction"), r.get("time"), rest)  # fmt: skip


def _side(records: list[dict], loss: str, side: Side) -> dict[tuple, dict]:
    return {
        _point(r, side): r
        for r in records
        if r["status"] == "ok" and r.get("base_loss", r["loss"]) == loss and _matches(r, side)
    }


def _worse(x: dict, y: dict) -> bool:
    """Whether x is worse than y at their point: more NaN/inf elements, or a bit or more lost beyond y's."""
    (nx, bx), (ny, by) = _judge(x), _judge(y)
    return nx > ny or (nx == ny and bx >= by + 1)


def _verdict(c: Choice, pairs: list[tuple[dict, dict]]) -> str:
    worse_a = sum(_worse(a, b) for a, b in pairs)
    worse_b = sum(_worse(b, a) for a, b in pairs)
    if worse_a and worse_b:
        return f"**neither** ({c.a.text} worse at {worse_a}, {c.b.text} at {worse_b} of {len(pairs)} points)"
    if not (worse_a or worse_b):
        return "**the same here**"
    better, worse, n = (c.b, c.a, worse_a) if worse_a else (c.a, c.b, worse_b)
    return f"**prefer {better.text}** ({worse.text} worse at {n} of {len(pairs)} points, never better)"


def lines(records: list[dict]) -> list[str]:
    """One line per choice and dtype where both sides were measured at the same points, then the
    error in nats of the framework's log-probabilities and divergences per dtype (which dtype)."""
    out = []
    for c in CHOICES:
        a, b = _side(records, c.loss, c.a), _side(records, c.loss, c.b)
        by_dtype: dict[tuple, list[tuple[dict, dict]]] = {}
        for key in set(a) & set(b):
            by_dtype.setdefault(key[:2], []).append((a[key], b[key]))
        for dd in sorted(by_dtype, key=lambda k: (dtype_rank(k[0]), k[1])):
            pairs = by_dtype[dd]
            wa, wb = _Worst(), _Worst()
            for ra, rb in pairs:
                wa.add(ra)
                wb.add(rb)
            out.append(
                f"- {c.question} — **{label_dtype(*dd)}**: {c.a.text}: {wa.text()}; {c.b.text}: {wb.text()} "
                f"→ {_verdict(c, pairs)}."
            )
    for loss in ("token_logprobs", "kl_div", "js_div", "entropy"):
        per_dtype: dict[tuple, _Worst] = {}
        for r in _side(records, loss, Side("torch")).values():
            per_dtype.setdefault((r["dtype"], r["device"]), _Worst()).add(r)
        measured = {k: w for k, w in per_dtype.items() if w.nats_text()}
        if len(measured) > 1:
            parts = [f"{label_dtype(*k)} {w.nats_text()}" for k, w in sorted(
                measured.items(), key=lambda kv: dtype_rank(kv[0][0]))]  # fmt: skip
            out.append(f"- Dtype, `torch` {loss} over every option swept: " + "; ".join(parts) + ".")
    return out


def section(records: list[dict]) -> str:
    """The report's section ('' when the run has none of these pairs)."""
    found = lines(records)
    if not found:
        return ""
    return (
        "## Choices of language-model training\n\nTwo ways of computing the same value, each at its worst "
        "over the points both were run at (value sets, scales, temperatures and the other options swept): "
        "NaN/inf elements (forward and gradients), bits lost, and for losses valued in nats the absolute "
        "error. Point by point, a side is worse where it has more NaN/inf elements, or as many and loses a "
        'bit or more beyond the other; "prefer" names a side that is never worse and sometimes better.\n\n'
        + "\n".join(found)
    )
