"""losscheck: a benchmark and numerical-stability auditor for loss functions.

The Python API (losscheck/api.py): `Config` (`Config.from_mapping`), `run`, `load`, `render`,
`compare` (-> `Verdict`), `probe`, with `Results`, and `ConfigError`/`LosscheckError` for bad
input. Each name is imported on first use, so that `import losscheck` (and `losscheck --help`)
imports neither torch nor any command module.
"""

__version__ = "0.1.0"

# name -> the module that defines it.
_EXPORTS = {
    "Config": "losscheck.config",
    "ConfigError": "losscheck.errors",
    "LosscheckError": "losscheck.errors",
    "Results": "losscheck.api",
    "Verdict": "losscheck.api",
    "run": "losscheck.api",
    "load": "losscheck.api",
    "render": "losscheck.api",
    "compare": "losscheck.api",
    "probe": "losscheck.api",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'losscheck' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
