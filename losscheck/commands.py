"""The commands of the command line (the group, in cli.py, imports this module when one of
them is invoked): each parses, calls one core function, renders, maps to an exit code.

This module imports no torch at load: compare, merge, baseline and report work from the
JSON alone, and bench validates its config before it imports the sweep (and torch).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import click

from . import ci, plots, report, results, summaries, verbosity
from .config import custom_spec, load_config
from .errors import LosscheckError
from .gate_policy import SETTINGS
from .progress import LogLines


def _gate_options(f):
    """Thresholds and outputs of the regression gate, shared by `bench --baseline` and `compare`.

    The threshold flags are made from gate_policy.SETTINGS (the flag, its help, what it
    allows, the default); the command receives them as one `overrides` dict, setting name ->
    value (None: the config's)."""
    flagged = [(s.flag, s) for s in SETTINGS if s.flag]

    @functools.wraps(f)
    def command(*args, **kwargs):
        return f(*args, overrides={s.name: kwargs.pop(s.name) for _, s in flagged}, **kwargs)

    options = [
        click.option(
            flag,
            s.name,
            type=_flag_type(s),
            default=None,
            help=f"{s.flag_help} (default: the config's gate.{s.name}, {s.default_text}).",
        )
        for flag, s in flagged
    ]
    options += [
        click.option(
            "--junit",
            "junit_path",
            type=click.Path(dir_okay=False),
            default=None,
            help="Write JUnit XML, one test case per point (not run: skipped, never passed).",
        ),
        click.option(
            "--allow-missing",
            is_flag=True,
            help="Points of the baseline absent from the current run do not fail the gate.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _flag_type(setting) -> click.ParamType:
    """The click type accepting what `setting` allows (its one-line error is click's, exit 2)."""
    if setting.kind == "choice":
        return click.Choice(setting.choices)
    if setting.kind == "probability":
        return click.FloatRange(min=setting.low, max=setting.high, min_open=True)
    return click.FloatRange(min=setting.low)


class ShardType(click.ParamType):
    name = "I/N"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            i, n = (int(v) for v in str(value).split("/"))
        except ValueError:
            self.fail(f"{value!r} is not I/N (e.g. 2/4)", param, ctx)
        if not 1 <= i <= n:
            self.fail(f"{value!r}: I must be between 1 and N", param, ctx)
        return (i, n)


def _gate(
    baseline: str,
    current: dict,
    current_path: Path,
    overrides: dict,
    junit_path,
    allow_missing: bool = False,
    remeasure=None,
    losses: tuple[str, ...] = (),
    markdown_path: str | None = None,
    as_json: bool = False,
) -> dict:
    """Compare and write the outputs; print the Markdown (-q: one verdict line; --json:
    nothing, the caller prints the summary). Returns the summary (summaries.comparison_summary)."""
    md_path = Path(markdown_path) if markdown_path else results.beside(current_path, ".compare.md")
    comparison, markdown = ci.check(
        baseline, current, current_path, overrides, md_path, junit_path, remeasure, allow_missing, losses
    )
    summary = summaries.comparison_summary(comparison, md_path, junit_path)
    level = verbosity.level()
    if not as_json and level >= 0:
        click.echo(markdown, nl=False)
        click.echo(f"comparison written to {md_path}", err=True)
    elif not as_json and level == -1:  # -q: the verdict in one line, in place of the Markdown
        click.echo(
            f"gate: {summary['verdict']}: {summary['compared']} points compared, {summary['regressions']} "
            f"regression(s), {summary['improvements']} improvement(s), {summary['missing']} missing"
        )
    return summary


@click.command()
@click.argument("config_path", required=False, type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--out",
    "--output-dir",
    "out_dir",
    default="reports",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for <name>.json and <name>.md (and <name>-<loss>.md for a big report).",
)
@click.option(
    "--gzip",
    "compress",
    is_flag=True,
    help="Write <name>.json.gz (gzip) instead of <name>.json; every command reads either.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads (default: the config's `threads`, else torch's default).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress: a bar on a terminal, otherwise a line per tenth of the points or per minute "
    "(default: on unless -q or -v is given).",
)
@click.option(
    "--baseline",
    type=click.Path(dir_okay=False),
    default=None,
    help="Gate the run against this results file: exit 1 on regression.",
)
@click.option(
    "--plots/--no-plots",
    "with_plots",
    default=True,
    show_default=True,
    help="PNG plots next to the report (needs matplotlib: the `plots` extra).",
)
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted run from its results file, without redoing its points."
)
@click.option(
    "--shard",
    type=ShardType(),
    default=None,
    metavar="I/N",
    help="Run a deterministic 1/N of the points (shard I of N); merge shards with `losscheck merge`.",
)
@click.option(
    "--impl",
    "impls",
    multiple=True,
    metavar="[LOSS,...=]MODULE:FUNCTION",
    help="Also audit your own implementation (torch tensors in and out): 'pkg.mod:fn' or "
    "'file.py:fn', for the config's losses or those named before '='. Runs that code.",
)
@click.option(
    "--numpy-impl",
    "numpy_impls",
    multiple=True,
    metavar="[LOSS,...=]MODULE:FUNCTION",
    help="Like --impl for a numpy implementation (arrays in, loss or (loss, grad) out; CPU).",
)
@click.option(
    "--loss", "only_losses", multiple=True, metavar="LOSS", help="Run only these losses of the config (repeatable)."
)
@_gate_options
@verbosity.json_option("the points by status, the output paths and the gate's verdict")
@verbosity.options
def bench(
    config_path: str | None,
    out_dir: str,
    compress: bool,
    threads: int | None,
    progress: bool | None,
    baseline: str | None,
    with_plots: bool,
    resume: bool,
    shard: tuple[int, int] | None,
    impls: tuple[str, ...],
    numpy_impls: tuple[str, ...],
    only_losses: tuple[str, ...],
    overrides: dict,
    junit_path,
    allow_missing,
    as_json: bool,
) -> None:
    """Run the sweep of CONFIG_PATH (or of the embedded default).

    Writes OUT/NAME.json (the results, saved as the sweep goes) and OUT/NAME.md (the
    report, with PNG plots); NAME is the config's `name`. A point that fails is recorded
    as an error and the sweep goes on.

    \b
    Examples:
      losscheck bench configs/quick.yaml -o /tmp/r     # the CI-sized sweep
      losscheck bench configs/ci.yaml --baseline reports/baseline.json --junit junit.xml
      losscheck bench configs/quick.yaml --loss bce --impl bce=mine.py:bce
      losscheck bench configs/default.yaml --shard 2/4 # then: losscheck merge
      losscheck bench configs/quick.yaml --json -q     # a JSON summary on stdout

    \b
    Exit codes:
      0    the sweep ran (with --baseline: and no regression)
      1    regression against --baseline
      2    bad input: config, flag or baseline (one line on stderr)
      130  interrupted: the finished points are written (continue with --resume)
    """
    config = _with_flags(load_config(config_path), impls, numpy_impls, only_losses)
    if baseline:
        results.load(baseline)  # a bad baseline is an input error before, not after, the sweep
    # Imported only now: a bad config or baseline fails before torch's seconds of import.
    from . import bench_run, sweep

    impl_table = sweep.resolve(config)  # imports custom code: a failure is an input error, before any file
    threads = bench_run.thread_count(config, threads)
    stem = bench_run.stem(config, shard)
    json_path, md_path = Path(out_dir) / f"{stem}.json{'.gz' if compress else ''}", Path(out_dir) / f"{stem}.md"
    command = bench_run.bench_command(config_path, out_dir, compress, threads, shard, impls, numpy_impls, only_losses)
    # A bar on a terminal; off one (a CI log) a plain line per tenth of the points or per
    # minute, since silence there looks like a hang. Nothing with --no-progress, nor with -q
    # or -v (a line per point) unless --progress asks for it.
    show = verbosity.level() == 0 if progress is None else progress
    bar = (
        None
        if not show
        else (
            lambda total: (
                LogLines(total, stem)
                if not sys.stderr.isatty()
                else click.progressbar(
                    length=total, label=f"{stem}: {total} points", file=sys.stderr, show_pos=True, show_eta=True
                )
            )
        )
    )
    run = bench_run.run(
        config,
        json_path,
        threads=threads,
        command=command,
        impls=impl_table,
        resume=resume,
        shard=shard,
        progress=bar,
        on_record=lambda r: verbosity.say(_point_line(r), 1, err=True),
        on_interrupt=lambda n: click.echo(
            f"\ninterrupted: writing the {n} finished points (continue with --resume)", err=True
        ),
        on_saved=lambda path: _write_report(results.load(path), md_path, with_plots),
    )
    counts = summaries.status_counts(run.records)
    if not as_json:
        verbosity.say(
            f"{len(run.records)} points ({counts['ok']} ok, {counts['error']} error, "
            f"{counts['skipped']} skipped) -> {json_path}, {md_path}",
            min_level=-1,
        )
    gate = None
    if run.complete and baseline:
        # Suspected slowdowns are re-measured here, in the same run, before they are called.
        gate = _gate(
            baseline,
            results.load(json_path),
            json_path,
            overrides,
            junit_path,
            allow_missing,
            sweep.remeasurer(config, impl_table, threads),
            only_losses,
            as_json=as_json,
        )
    if as_json:
        verbosity.print_json(summaries.bench_summary(run.records, run.complete, json_path, md_path, gate))
    if not run.complete:
        sys.exit(130)
    if gate and gate["failed"]:
        sys.exit(1)


def _point_line(r: dict) -> str:
    """One finished point, as bench -v prints it."""
    where = (
        f"{r['loss']} {r['impl']} {r['dtype']} {r['device']} batch {r['batch']} scale {r['scale']:g} "
        f"{r['distribution']}" + (f" {r['options']}" if r.get("options") else "")
    )
    return f"{where}: {r['status']}" + (f" ({r['message']})" if r.get("message") else "")


@click.command("compare")
@click.argument("baseline_path", type=click.Path(dir_okay=False))
@click.argument("current_path", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    "--out",
    "output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the Markdown comparison (default: CURRENT_PATH with .compare.md).",
)
@_gate_options
@verbosity.json_option("the verdict, its counts and every regression")
@verbosity.options
def compare_cmd(
    baseline_path: str,
    current_path: str,
    output: str | None,
    overrides: dict,
    junit_path,
    allow_missing: bool,
    as_json: bool,
) -> None:
    """Gate CURRENT_PATH against BASELINE_PATH: exit 1 on a regression.

    The Markdown comparison goes to stdout, to -o FILE (default: next to CURRENT_PATH,
    .compare.md) and, when GITHUB_STEP_SUMMARY is set, to the job summary.

    \b
    Examples:
      losscheck compare reports/baseline.json out/ci.json
      losscheck compare reports/baseline.json out/ci.json --junit junit.xml -q
      losscheck compare reports/baseline.json out/ci.json --json

    \b
    Exit codes:
      0  no regression
      1  regression (or points of the baseline missing, without --allow-missing)
      2  bad input: a results file unreadable, of another schema or incomplete
    """
    current = results.load(current_path)
    summary = _gate(
        baseline_path,
        current,
        Path(current_path),
        overrides,
        junit_path,
        allow_missing,
        markdown_path=output,
        as_json=as_json,
    )
    if as_json:
        verbosity.print_json(summary)
    if summary["failed"]:
        sys.exit(1)


@click.command("merge")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    "--out",
    "output",
    required=True,
    type=click.Path(dir_okay=False),
    help="The merged results file (its report goes next to it, .md).",
)
@click.option(
    "--plots/--no-plots", "with_plots", default=True, show_default=True, help="PNG plots next to the merged report."
)
@verbosity.options
def merge_cmd(paths: tuple[str, ...], output: str, with_plots: bool) -> None:
    """Merge the results of the shards of one run (bench --shard).

    \b
    Example:
      losscheck merge out/default.shard-*-of-4.json -o out/default.json
    """
    merged = results.merge([(p, results.load(p)) for p in paths])
    out = Path(output)
    results.save(merged, out)
    _write_report(results.load(out), results.beside(out, ".md"), with_plots)
    missing = merged.get("missing_shards")
    state = (
        "complete"
        if merged["complete"]
        else f"incomplete: shard(s) {', '.join(map(str, missing))} missing (not passed by any gate)"
        if missing
        else "incomplete (a shard was interrupted)"
    )
    verbosity.say(f"merged {len(paths)} files, {len(merged['records'])} points, {state} -> {out}", min_level=-1)


@click.command("baseline")
@click.argument("results_path", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    "--out",
    "output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the baseline (e.g. reports/baseline.json).",
)
@verbosity.options
def baseline_cmd(results_path: str, output: str) -> None:
    """Accept RESULTS_PATH as the baseline the gate compares against.

    \b
    Example:
      losscheck bench configs/ci.yaml -o out && losscheck baseline out/ci.json -o reports/baseline.json
    """
    data, warnings = ci.accept(results_path, output)
    verbosity.say(f"baseline: {len(data['records'])} points from {results_path} -> {output}", min_level=-1)
    if warnings:
        # Accepted all the same: these timings will be "not judged" by the gate, not failed.
        click.echo(
            f"warning: {len(warnings)} timing(s) of {results_path} seem unstable; the gate will not "
            "judge them (re-run on a quieter machine to gate them):",
            err=True,
        )
        for w in warnings[:20]:
            click.echo(f"  {w}", err=True)
        if len(warnings) > 20:
            click.echo(f"  ... and {len(warnings) - 20} more", err=True)


def _with_flags(config, impls, numpy_impls, only_losses):
    """The config with bench's --loss, --impl and --numpy-impl applied."""
    if only_losses:
        # Every grid's losses (`extra:` grids may have their own); each grid keeps only these.
        missing = [x for x in only_losses if x not in config.run_losses]
        if missing:
            raise LosscheckError(f"--loss {missing[0]}: not among the config's losses ({', '.join(config.run_losses)})")
        config = config.only(only_losses)
    specs = [parse_impl_flag(i, "torch", "--impl") for i in impls] + [
        parse_impl_flag(i, "numpy", "--numpy-impl") for i in numpy_impls
    ]
    names = [c.name for c in config.custom]
    for spec in specs:
        if spec.name in names:
            raise LosscheckError(f"{spec.function}: a custom implementation named {spec.name!r} is already in the run")
        names.append(spec.name)
    return dataclasses.replace(config, custom=config.custom + tuple(specs)) if specs else config


def parse_impl_flag(value: str, api: str, flag: str):
    """'[loss,...=]module:function' -> CustomSpec."""
    losses: list[str] = []
    head, sep, rest = value.partition("=")
    if sep and ":" not in head:
        losses, value = [x for x in head.split(",") if x], rest
    return custom_spec(value, None, losses, api, "<command line>", flag)


def _write_report(data: dict, md_path: Path, with_plots: bool) -> None:
    figures = None
    if with_plots:
        figures = (
            plots.write_plots(data, md_path.parent, md_path.stem)
            if plots.available()
            else f"matplotlib is not installed ({plots.INSTALL_HINT}); tables only"
        )
    report.write(data, md_path, figures)


@click.command("report")
@click.argument("results_path", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    "--out",
    "output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Markdown file to write (default: next to the results, .md). A big report also writes "
    "one page per loss beside it, FILE's name with -LOSS (e.g. options-cross_entropy.md).",
)
@click.option("--stdout", "to_stdout", is_flag=True, help="Print the Markdown instead of writing a file (no plots).")
@click.option(
    "--plots/--no-plots",
    "with_plots",
    default=True,
    show_default=True,
    help="PNG plots next to the report (needs matplotlib: the `plots` extra).",
)
@verbosity.options
def report_cmd(results_path: str, output: str | None, to_stdout: bool, with_plots: bool) -> None:
    """Re-render the Markdown report (and plots) from a results file.

    Reads the JSON alone: neither torch nor any custom implementation is imported.
    """
    data = results.load(results_path)
    if to_stdout:
        click.echo(report.render(data), nl=False)
        return
    target = Path(output) if output else results.beside(results_path, ".md")
    _write_report(data, target, with_plots)
    verbosity.say(f"wrote {target}")
