"""The Python API: what the commands do, as calls a notebook, a test or a CI script can make.

    import losscheck
    cfg = losscheck.Config.from_mapping({"name": "mine", "losses": ["bce_with_logits"], ...})
    res = losscheck.run(cfg, threads=2)              # -> Results
    print(losscheck.render(res))                     # the Markdown report
    verdict = losscheck.compare(losscheck.load("baseline.json"), res, bits=0.5)
    assert verdict.passed, verdict.render()
    losscheck.probe("bce_with_logits", [100.0, -3.0], [0, 1], dtype="float16").render()

Every bad input is a `ConfigError` (or another `LosscheckError`) with the one-line message
the CLI prints. The results are the results file's document (schema 3): `Results.data` is
exactly what `save` writes and `load` reads, so a file and an object are interchangeable.
Torch is imported only by `run` and `probe`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import ci, gate, report, results
from .config import Config, as_input, config_from_dict
from .gate import GatePolicy
from .gate_policy import BY_NAME

# The documented exit codes of the CLI, for callers that map a Verdict to one.
EXIT_PASSED, EXIT_FAILED = 0, 1


class Results:
    """A results document (a results file's content) with accessors; `data` is the document."""

    def __init__(self, data: dict, path: str | Path | None = None):
        self.data = data
        self.path = Path(path) if path is not None else None

    @property
    def records(self) -> list[dict]:
        return self.data["records"]

    @property
    def findings(self) -> list[dict]:
        return self.data.get("findings", [])

    @property
    def environment(self) -> dict:
        return self.data.get("environment", {})

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete", True))

    @property
    def config(self) -> Config:
        """The config as run, validated again (from any schema's stored form)."""
        return config_from_dict(as_input(self.data.get("config", {})), str(self.path or "<results>"))

    def save(self, path: str | Path) -> Path:
        """Write the results file (strict JSON, atomically); returns its path."""
        path = Path(path)
        results.save(self.data, path)
        self.path = path
        return path

    def render(self) -> str:
        return render(self)

    def __repr__(self) -> str:
        return f"Results({self.data.get('config', {}).get('name')!r}, {len(self.records)} records)"


@dataclass
class Verdict:
    """The gate's answer for a whole run (not one point: that is `gate.Verdict`)."""

    comparison: gate.Comparison
    policy: GatePolicy
    baseline_name: str = "baseline"
    current_name: str = "current"

    @property
    def failed(self) -> bool:
        return self.comparison.failed

    @property
    def passed(self) -> bool:
        return not self.comparison.failed

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failed else EXIT_PASSED

    @property
    def regressions(self) -> list[gate.Verdict]:
        return self.comparison.regressions

    def render(self) -> str:
        """The Markdown comparison `losscheck compare` writes."""
        from .compare_report import render_markdown

        return render_markdown(self.comparison, self.policy, self.baseline_name, self.current_name)

    def __bool__(self) -> bool:
        return self.passed


def _config(config) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return Config.from_mapping(dict(config))
    from .errors import ConfigError

    raise ConfigError(
        "<api>",
        "config",
        f"expected a Config or a mapping, got {type(config).__name__}",
        "losscheck.Config.from_mapping({...}) or a dict of the config's keys",
    )


def run(
    config: Config | Mapping,
    *,
    threads: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    on_record: Callable[[dict], None] | None = None,
    command: str = "losscheck.run",
) -> Results:
    """Run the sweep of `config` (a Config, or a mapping validated as one) in this process and
    return its results; the same path as `losscheck bench` (losscheck/bench_run.py).

    out: also write the results there, as the sweep goes (a `.json` or `.json.gz` path, or a
    directory that gets `<name>.json`, `<name>.shard-I-of-N.json` for a shard); resume: keep
    the points of an earlier run of the same config in that file (needs `out`); shard: (I, N),
    run the I-th of N deterministic parts; on_record: called with each finished point.
    Ctrl-C saves the finished points (complete: false) and raises KeyboardInterrupt."""
    cfg = _config(config)
    if resume and out is None:
        raise TypeError("run(resume=True) needs out=: the results file to resume")
    import torch  # only now: reading, rendering and comparing need no torch

    from . import bench_run

    threads = bench_run.thread_count(cfg, threads)
    path = None
    if out is not None:
        path = Path(out)
        if not path.name.endswith((".json", ".json.gz")):
            path = path / f"{bench_run.stem(cfg, shard)}.json"
    before = torch.get_num_threads()
    try:
        outcome = bench_run.run(
            cfg, path, threads=threads, command=command, resume=resume, shard=shard, on_record=on_record
        )
    finally:
        torch.set_num_threads(before)  # the sweep sets the process-wide count; a library leaves it
    return Results(outcome.document(), path)


def load(path: str | Path) -> Results:
    """A results file of any schema (1, 2, 3), validated; a bad one is a `ResultsError`."""
    return Results(results.load(path), path)


def _document(x) -> dict:
    if isinstance(x, Results):
        return x.data
    if isinstance(x, (str, Path)):
        return results.load(x)
    if isinstance(x, dict):
        return x
    raise TypeError(f"expected Results, a results document or a path, not {type(x).__name__}")


def render(res: Results | dict | str | Path) -> str:
    """The Markdown report of a run (what `losscheck report` writes), without plots."""
    return report.render(_document(res))


def compare(
    baseline: Results | dict | str | Path,
    current: Results | dict | str | Path,
    *,
    allow_missing: bool = False,
    **thresholds,
) -> Verdict:
    """Gate `current` against `baseline` with the policy stored in `current`'s config and the
    given overrides (the names of `gate:` / the flags: bits, ulp, time_factor, timing, ...)."""
    for name in thresholds:
        if name not in BY_NAME:
            raise TypeError(f"compare() got an unknown threshold {name!r}; allowed: {', '.join(BY_NAME)}")
    base, cur = _document(baseline), _document(current)
    names = (_name(baseline, "baseline"), _name(current, "current"))
    comparison, policy = ci.judge(base, cur, thresholds, None, allow_missing, names)
    return Verdict(comparison, policy, *names)


def _name(x, default: str) -> str:
    if isinstance(x, (str, Path)):
        return str(x)
    if isinstance(x, Results) and x.path is not None:
        return str(x.path)
    return default


def probe(
    loss: str,
    input,
    target,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    reduction: str = "mean",
    weight=None,
    pos_weight=None,
    label_smoothing=None,
    ignore_index=None,
    impls=(),
    numpy_impls=(),
    grad_output=None,
    dim=None,
    precision: str = "native",
):
    """Audit `loss` on these exact tensors (or arrays, lists, or file specs as `losscheck probe`
    takes them), as bench measures a point; returns a `probing.ProbeResult` (`.render()`,
    `.to_json()`, `.results`, `.findings`)."""
    from .probing import run_probe

    return run_probe(
        loss,
        input,
        target,
        dtype=dtype,
        device=device,
        reduction=reduction,
        weight=weight,
        pos_weight=pos_weight,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        impls=impls,
        numpy_impls=numpy_impls,
        grad_output=grad_output,
        dim=dim,
        precision=precision,
    )
