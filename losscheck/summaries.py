"""The machine-readable summaries the commands print with `--json`, as plain dicts.

Kept out of the commands so that a script (or a test) gets the same dicts without Click,
and torch-free: `inventory` says what is installed through `importlib.util.find_spec` and
`importlib.metadata`, which import nothing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from . import families
from .catalog import LOSS_INFO, REDUCTIONS
from .formats import FORMATS
from .inputs import DESCRIPTIONS, DISTRIBUTIONS
from .results import KEY_FIELDS, STATUSES

# The kind of each built-in implementation (the families' kinds; tests/test_cli_conventions.py
# checks it against the losses' own implementations).
BUILTIN_KINDS = {f.name: f.kind for f in families.all_families()}
# What losscheck uses and for what: `list` says which are installed here.
PACKAGES = {
    "torch": "every measurement (bench, explain, probe)",
    "numpy": "--numpy-impl, the float64 reference",
    "matplotlib": "the PNG plots (extra `plots`)",
    "mpmath": "the reference's certification (extra `test`)",
    "hypothesis": "property tests (extra `test`)",
}


def package_version(name: str) -> str | None:
    """The installed version of `name`, or None if it cannot be imported here (nothing is imported)."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def inventory() -> dict:
    """What `losscheck list` shows: losses and their implementations, the implementation
    families with their availability here (nothing imported), dtypes, value sets, reductions
    and which of the packages losscheck uses are installed."""
    fams = families.all_families()
    return {
        "losses": [
            {
                "name": info.name,
                "summary": info.summary,
                "options": list(info.options),
                "implementations": [{"name": f.name, "kind": f.kind} for f in fams],
            }
            for info in LOSS_INFO.values()
        ],
        "families": [
            {
                "name": f.name,
                "kind": f.kind,
                "summary": f.summary,
                "default": f.default,
                "requires": list(f.requires),
                "unavailable": f.unavailable(),  # None: available
                "install": f.install or None,
            }
            for f in fams
        ],
        "dtypes": [
            {"name": f.name, "significand_bits": f.significand_bits, "default_threshold_bits": f.default_threshold_bits}
            for f in FORMATS.values()
        ],
        "distributions": [{"name": d, "inputs": DESCRIPTIONS[d]} for d in DISTRIBUTIONS],
        "reductions": list(REDUCTIONS),
        "packages": {name: {"version": package_version(name), "used_for": why} for name, why in PACKAGES.items()},
    }


def status_counts(records: list[dict]) -> dict[str, int]:
    return {s: sum(r["status"] == s for r in records) for s in STATUSES}


def _point(key: tuple) -> dict:
    point = dict(zip(KEY_FIELDS, key, strict=True))  # a key is results.record_key: one item per field
    if isinstance(point.get("options"), tuple):  # results.record_key's hashable form of the options dict
        point["options"] = dict(point["options"])
    return point


def comparison_summary(comparison, markdown_path=None, junit_path=None) -> dict:
    """The gate's verdict and its counts (a gate.Comparison), with every regression named."""
    return {
        "verdict": "regression" if comparison.failed else "pass",
        "failed": comparison.failed,
        "compared": comparison.compared,
        "unchanged": comparison.unchanged,
        "regressions": len(comparison.regressions),
        "improvements": len(comparison.improvements),
        "timings_not_judged": len(comparison.not_judged),
        "missing": len(comparison.only_baseline),
        "missing_fails": comparison.missing_fails,
        "new": len(comparison.only_current),
        "not_run": len(comparison.not_run),
        "not_gated": len(comparison.not_gated),
        "regression_points": [
            {
                **_point(v.key),
                "gate": v.gate,
                "baseline": v.baseline,
                "current": v.current,
                "why": v.why,
                "against": v.against,
            }
            for v in comparison.regressions
        ],
        "comparison": str(markdown_path) if markdown_path else None,
        "junit": str(junit_path) if junit_path else None,
    }


def bench_summary(records: list[dict], complete: bool, json_path, md_path, gate: dict | None) -> dict:
    """What `bench --json` prints: points by status, the output paths, the gate's summary (or None)."""
    return {
        "points": len(records),
        "status": status_counts(records),
        "complete": complete,
        "results": str(json_path),
        "report": str(md_path),
        "gate": gate,
    }
