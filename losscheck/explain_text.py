"""Text helpers of `losscheck explain` (explain.py): wrapped paragraphs and bullets, tables,
numbers, and LaTeX formulas as unicode text."""

from __future__ import annotations

import math
import re
import textwrap

from tabulate import tabulate

WIDTH = 100  # prose is wrapped to this many columns


def para(text: str) -> str:
    return textwrap.fill(text, WIDTH, break_on_hyphens=False, break_long_words=False)


def bullet(text: str, indent: str = "") -> str:
    return textwrap.fill(
        text,
        WIDTH,
        initial_indent=indent + "- ",
        subsequent_indent=indent + "  ",
        break_on_hyphens=False,
        break_long_words=False,
    )


def table(rows, headers) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def fmt_pair(a: float, b: float) -> tuple[str, str]:
    """Two values with enough digits to tell them apart (up to 17)."""
    if not (math.isfinite(a) and math.isfinite(b)) or a == b or a == 0 or b == 0:
        return fmt_value(a), fmt_value(b)
    for digits in range(4, 18):
        x, y = f"{a:#.{digits}g}", f"{b:#.{digits}g}"
        if x != y:
            return x, y
    return x, y


def fmt_value(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "−inf"
    if v == 0:
        return "0"
    return f"{v:.4g}"


_LATEX_SYMBOLS = {
    "sigma": "σ",
    "ell": "ℓ",
    "partial": "∂",
    "sum": "Σ",
    "prod": "Π",
    "cdot": "·",
    "infty": "∞",
    "alpha": "α",
    "beta": "β",
    "gamma": "γ",
    "mu": "μ",
    "epsilon": "ε",
    "varepsilon": "ε",
    "lambda": "λ",
    "pi": "π",
    "tau": "τ",
    "theta": "θ",
    "times": "×",
    "leq": "≤",
    "le": "≤",
    "geq": "≥",
    "ge": "≥",
    "neq": "≠",
    "ne": "≠",
    "in": "∈",
    "to": "→",
    "quad": " ",
    "qquad": " ",
}
_LATEX_DROP = ("left", "right", "big", "Big", "bigg", "Bigg", "textstyle", "displaystyle", "limits")


def unlatex(s: str) -> str:
    """A best-effort LaTeX -> unicode text for the `Formulas` of a loss without prose."""
    s = s.replace("\\{", "\x00").replace("\\}", "\x01").replace("\\|", "‖")
    s = re.sub(r"\\[,;: !]", " ", s)
    s = re.sub(r"\\(?:" + "|".join(_LATEX_DROP) + r")\b", "", s)

    def frac(m: re.Match) -> str:
        a, b = (x if re.fullmatch(r"[\w.]+", x) else f"({x})" for x in (m.group(1), m.group(2)))
        return f"{a}/{b}"

    def sup(m: re.Match) -> str:
        return "^" + (m.group(1) if len(m.group(1)) <= 2 else f"({m.group(1)})")

    for _ in range(20):  # innermost groups first, until nothing changes
        new = re.sub(r"\\(?:text|mathrm|operatorname|mathbf|mathit)\{([^{}]*)\}", r"\1", s)
        new = re.sub(r"\^\{([^{}]*)\}", sup, new)
        new = re.sub(r"_\{([^{}]*)\}", r"_\1", new)
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", frac, new)
        if new == s:
            break
        s = new

    def word(m: re.Match) -> str:
        name = m.group(1)
        return _LATEX_SYMBOLS.get(name, " " + name)  # log, exp, max, ...: a word, spaced

    s = re.sub(r"\\([A-Za-z]+)", word, s)
    s = s.replace("{", "").replace("}", "").replace("-", "−").replace("\x00", "{").replace("\x01", "}")
    s = re.sub(r"([(\[]) +", r"\1", s)
    s = re.sub(r"((?:^|[(\[=,])\s*)−\s+", r"\1−", s)  # a unary minus: no space after it
    return re.sub(r"\s+", " ", s).strip()
