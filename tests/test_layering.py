"""The package's shape: no module over 600 lines, and no module importing one from a layer above it.

Imports are read with `ast` (module level and inside functions alike: a lazy import is still a
dependency), so the test needs no import of the package. Every module must be placed in a
layer: a new one that is not fails here until it is.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "losscheck"
MAX_LINES = 600
# Modules over the limit for a stated reason; each entry must still be needed (checked below).
OVER_LIMIT: dict[str, str] = {}

# Lowest first. A module may import from its own layer and the layers below it.
LAYERS: list[tuple[str, set[str]]] = [
    # No torch-dependent logic of the package above: facts, formats, errors, the gate's settings.
    ("foundation", {"losscheck", "losscheck.errors", "losscheck.formats", "losscheck.units", "losscheck.stats",
                    "losscheck.timing", "losscheck.environment", "losscheck.catalog", "losscheck.families*", "losscheck.arrays",
                    "losscheck.gate_policy", "losscheck.config_yaml", "losscheck.inputs", "losscheck.dtypes",
                    "losscheck.safeio", "losscheck.progress"}),
    ("config", {"losscheck.config", "losscheck.config_sections", "losscheck.config_axes", "losscheck.accumulate_section"}),
    # isolation: its error messages ask memory whether an exception is an out-of-memory one.
    ("measurement", {"losscheck.isolation", "losscheck.precision", "losscheck.reference", "losscheck.rounding", "losscheck.extended_rows", "losscheck.doubledouble", "losscheck.metrics", "losscheck.memory", "losscheck.custom",
                     "losscheck.losses*"}),
    ("analysis", {"losscheck.analysis", "losscheck.findings", "losscheck.results"}),
    ("evaluation", {"losscheck.sweep", "losscheck.points", "losscheck.worker", "losscheck.gate", "losscheck.gate_checks", "losscheck.explain_limits", "losscheck.explain_prose",
                   "losscheck.explain_live", "losscheck.explain_text", "losscheck.accumulate"}),
    ("report", {"losscheck.report", "losscheck.report_format", "losscheck.report_detail", "losscheck.report_findings", "losscheck.report_families", "losscheck.report_lm",
                "losscheck.compare_report", "losscheck.plots", "losscheck.ci",
                "losscheck.explain", "losscheck.probing*"}),
    ("api", {"losscheck.api", "losscheck.bench_run"}),
    ("commands", {"losscheck.commands", "losscheck.info_commands", "losscheck.probe_command", "losscheck.accumulate_command", "losscheck.summaries", "losscheck.verbosity"}),
    ("cli", {"losscheck.cli", "losscheck.__main__"}),
]


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").relative_to(PACKAGE.parent).parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or (name.endswith("*") and (module == name[:-1] or module.startswith(name[:-1] + "."))):
                return i
    return None


def imported(module: str, path: Path) -> set[str]:
    """The package's modules that `module` imports (`from . import x` names module x when x is
    one, else the package it comes from)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "losscheck"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "losscheck":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return out


def test_the_import_parser_sees_relative_lazy_and_absolute_imports():
    # A check of the checker: these imports are known to exist in these modules.
    assert "losscheck.gate_policy" in imported("losscheck.config", MODULES["losscheck.config"])
    assert "losscheck.probing" in imported("losscheck.api", MODULES["losscheck.api"])  # inside a function
    assert "losscheck.bench_run" in imported("losscheck.api", MODULES["losscheck.api"])  # `from . import bench_run`
    assert "losscheck.reference" in imported("losscheck.losses.base", MODULES["losscheck.losses.base"])


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_layer_above(module):
    mine = layer_of(module)
    above = sorted(f"{other} ({LAYERS[layer_of(other)][0]})" for other in imported(module, MODULES[module])
                   if layer_of(other) is not None and layer_of(other) > mine)
    assert above == [], f"{module} ({LAYERS[mine][0]}) imports from a layer above it"


def test_config_does_not_import_the_gate():
    assert "losscheck.gate" not in imported("losscheck.config", MODULES["losscheck.config"])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    if module in OVER_LIMIT:
        assert lines > MAX_LINES, f"{module} is {lines} lines now: drop it from OVER_LIMIT"
    else:
        assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES})"


def test_no_submodule_shadows_an_exported_name():
    # `losscheck.probe` is a function of the API: a module losscheck/probe.py would replace it
    # as the package's attribute as soon as anything imported that module.
    import losscheck
    assert [n for n in losscheck.__all__ if f"losscheck.{n}" in MODULES] == []


def test_every_subpackage_is_installed():
    # setuptools lists the packages by hand (pyproject.toml): a new subpackage left out of the
    # list works from a checkout and is missing from an installed wheel.
    import tomllib
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")} <= listed
