"""A sweep run to a results file: the one path of `losscheck bench` and `losscheck.run`.

What it owns: the thread count's bounds, the results file's lock, the incremental save (a
kill leaves a valid file of all but the last seconds' points), `--resume` (the records of an
earlier run of the same config are kept, not redone), shards, and the results document with
the command line it records. What it leaves to its caller: progress display, the report,
the gate, printing and exit codes (the CLI), or returning a `Results` (the API).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from . import results
from .errors import LosscheckError


def thread_count(config, threads: int | None) -> int:
    """`threads`, else the config's, else torch's default; bounded by the CPUs this process may use."""
    import torch

    threads = threads or config.threads or torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads > 4 * cpus:
        # torch segfaults on absurd counts (--threads 100000); more than a few per CPU only slows.
        raise LosscheckError(
            f"--threads {threads}: more than 4 × the {cpus} CPU(s) this process may use; allowed: 1 to {4 * cpus}"
        )
    return threads


def stem(config, shard: tuple[int, int] | None) -> str:
    """The results file's name without suffix: the config's name, with the shard if any."""
    return config.name if not shard else f"{config.name}.shard-{shard[0]}-of-{shard[1]}"


def bench_command(
    config_path: str | None,
    out_dir: str,
    compress: bool,
    threads: int,
    shard: tuple[int, int] | None,
    impls=(),
    numpy_impls=(),
    only_losses=(),
) -> str:
    """The command line a results file records: enough to run the same sweep again."""
    flags = [
        *(f for i in impls for f in ("--impl", i)),
        *(f for i in numpy_impls for f in ("--numpy-impl", i)),
        *(f for loss in only_losses for f in ("--loss", loss)),
    ]
    return shlex.join(
        [
            "losscheck",
            "bench",
            *([config_path] if config_path else []),
            "--out",
            out_dir,
            *(["--gzip"] if compress else []),
            "--threads",
            str(threads),
            *(["--shard", f"{shard[0]}/{shard[1]}"] if shard else []),
            *flags,
        ]
    )


@dataclass
class Outcome:
    """What a run left: its records (resumed ones included) and whether it finished."""

    records: list[dict]
    complete: bool
    make: Callable[[bool], dict]

    def document(self) -> dict:
        """The results document (made on demand: findings over a big sweep take a while)."""
        return self.make(self.complete)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int, record: dict | None = None) -> None:
        pass


def run(
    config,
    json_path: Path | None,
    *,
    threads: int,
    command: str,
    impls=None,
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    on_record: Callable[[dict], None] | None = None,
    progress: Callable[[int], AbstractContextManager] | None = None,
    on_interrupt: Callable[[int], None] | None = None,
    on_saved: Callable[[Path], None] | None = None,
) -> Outcome:
    """Run the sweep of `config` (validated; `impls`: sweep.resolve's table, resolved here if
    None) with `threads`, saving to `json_path` as it goes (None: no file, and no resume).

    `progress(total)` makes a context manager with `update(n, record)` (a bar); `on_record`
    sees each finished point; `on_saved(json_path)` runs after the last save, even when the
    run fails (the CLI writes the report there). Ctrl-C: with `on_interrupt`, it is called
    with the number of finished points, they are saved (complete: false) and the outcome is
    returned; without it, they are saved and KeyboardInterrupt propagates.
    """
    from . import sweep  # torch: only a run needs it

    impls = sweep.resolve(config) if impls is None else impls
    if json_path is None:
        return _run(config, None, threads, command, impls, False, shard, on_record, progress, on_interrupt, None)
    # One writer per results file, and a directory that can be written, before any point runs.
    with results.exclusive(json_path):
        return _run(
            config, json_path, threads, command, impls, resume, shard, on_record, progress, on_interrupt, on_saved
        )


def _run(
    config, json_path, threads, command, impls, resume, shard, on_record, progress, on_interrupt, on_saved
) -> Outcome:
    from . import environment, sweep

    records: list[dict] = _resumed(json_path, config, threads) if resume else []
    done = {results.record_key(r) for r in records}
    total = sweep.count_points(config, shard, done)
    env = environment.capture(threads)

    accumulated: list[dict] = []  # the `accumulate:` section's tables, once the sweep is done

    def make(complete: bool) -> dict:
        data = _results(config, env, records, command, complete, shard)
        if accumulated:
            data["accumulate"] = accumulated
        return data

    saver = _Incremental(make, json_path) if json_path is not None else None
    complete = False

    def record(r: dict) -> None:
        records.append(r)
        bar.update(1, r)
        if saver:
            saver.tick()
        if on_record:
            on_record(r)

    with progress(total) if progress else _NoProgress() as bar:
        try:
            sweep.run(config, threads, shard=shard, done=done, impls=impls, on_record=record)
            accumulated += _accumulate(config, shard)
            complete = True
        except KeyboardInterrupt:
            if on_interrupt is None:
                raise
            on_interrupt(len(records))
        finally:
            if saver:
                saver.save(complete)
                if on_saved:
                    on_saved(json_path)
    return Outcome(records, complete, make)


def _accumulate(config, shard) -> list[dict]:
    """The `accumulate:` section's experiments, one per dtype (in the first shard only: merge
    keeps them from there)."""
    if config.accumulate is None or (shard and shard[0] != 1):
        return []
    from . import accumulate, accumulate_section

    a = config.accumulate
    spec = {k: a[k] for k in accumulate_section.KEYS if k != "dtypes"}  # the section's keys, one dtype each
    return [accumulate.run(accumulate.Spec(**spec, dtype=d, seed=config.seed)) for d in a["dtypes"]]


def _results(config, env, records, command, complete, shard) -> dict:
    data = results.make_results(
        config.as_dict(), env, sorted(records, key=lambda r: (r["index"], r["impl"])), command, complete
    )
    if shard:
        data["shard"] = list(shard)
    return data


class _Incremental:
    """Writes the results file atomically as the sweep goes (at most every `every` seconds,
    and never more than about 2% of the time: a big file takes a while to write), so that a
    kill leaves a valid file of all but the last seconds' points. Files written before the
    sweep is complete are compact JSON (`results.dumps`); the complete one is indented."""

    # Wait at least this many times the last write's duration. With compact writes (0.36 s for
    # 17,136 records) the wait between writes is what 20 gave indented ones (0.85 s): 17 s.
    DUTY = 50

    def __init__(self, make, path: Path, every: float = 2.0):
        self.make, self.path, self.every = make, path, every
        self.last = time.monotonic()
        self.wait = every

    def tick(self) -> None:
        if time.monotonic() - self.last >= self.wait:
            self.save(False)

    def save(self, complete: bool) -> None:
        start = time.monotonic()
        results.save(self.make(complete), self.path, compact=not complete)
        self.last = time.monotonic()
        self.wait = max(self.every, self.DUTY * (self.last - start))


def _resumed(json_path: Path, config, threads: int) -> list[dict]:
    """The records of an earlier run of the same config, to be kept and not redone."""
    if not json_path.exists():
        return []
    data = results.load(json_path)
    if not results.same_config(data["config"], config.as_dict()):
        raise LosscheckError(f"{json_path}: made with another config; --resume continues a run of the same config")
    from . import environment  # imports torch, which a run has imported already

    here = environment.capture(threads)
    for field in results.MERGE_CHECKED:
        if data["environment"].get(field) != here.get(field):
            raise LosscheckError(
                f"{json_path}: made with {field} {data['environment'].get(field)!r}, this is "
                f"{here.get(field)!r}; --resume does not mix versions or thread counts "
                "(rerun without it, or with the same --threads)"
            )
    if any("index" not in r for r in data["records"]):
        raise LosscheckError(
            f"{json_path}: written before --resume support (records lack 'index'); rerun without --resume"
        )
    return list(data["records"])
