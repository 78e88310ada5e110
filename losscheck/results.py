"""The results file: versioned JSON, written so that it diffs cleanly and any JSON parser reads it.

Format history (bump SCHEMA_VERSION and describe the change here):
  1 — first version: {schema_version, created, command, complete, environment, config,
      records: [...]}, one record per sweep point (see README, "Results file").
  2 — records gain `options` (the loss options set at the point, {} for none), `time`
      (sequence length, null for other losses), `memory` (peak memory, or null) and an
      optional `undefined` (why the reduced reference is undefined); `reduction` is part
      of the sweep key; `backward` may be null for an `ok` record (a numpy implementation
      without gradient) and `forward.reduced_ulp` is null for reduction "none". Version 1
      files are read as version 2 with options {} and time null.
  3 — the version of the whole 2026-11 wave (issues 12-19); fields other issues of the wave
      add are optional, so that one version covers them. Added so far: a top-level
      `findings` list (each {loss, variant, impl, impl_kind, dtype, device, kind, evidence,
      message}: the cause of a failure, see losscheck/findings.py and docs/METRICS.md
      "Findings"); `forward`/`backward` gain the counts
      `clamped` (a finite result where the rounded reference is infinite) and `underflow`
      (exactly 0 where it is not), and their bits are capped at the format's precision;
      `timing` keeps the raw per-run block times (`forward_times_s`, `backward_times_s`);
      the environment records what decides kernel choice (`cpu_capability`, `torch_build`,
      GPU names, `threads`); a merged file names its `missing_shards`. Version 1 and 2 files
      are read as version 3: the missing counts are unknown (absent), their findings are
      derived on load. From version 3 `config` is stored in the input format (valid YAML
      input for `losscheck bench`); version 1-2 files hold the former dataclass dump (`gate:
      {default, per_loss}`), which `config.as_input` turns into the input format.
      `environment.omp_wait_policy`, `environment.gomp_spincount`: OMP_WAIT_POLICY and
      GOMP_SPINCOUNT as the run had them (the command line sets GOMP_SPINCOUNT 10000 where
      neither is set; null: unset); they move timings, not values.
      `environment.inputs` names the generator that drew the points' inputs ("torch-1":
      torch.Generator on the point's device, see losscheck/inputs.py); absent: the former
      numpy generator ("numpy"). Files of different generators hold other input values at
      the same points: merge refuses them, compare and the gate do not judge their points.
      Precision policies (losscheck/precision.py): `options.precision` ("autocast",
      "upcast"; absent: native) on float16/bfloat16 points; such records carry
      `output_dtype` and `compute_dtype`, and a forward the policy widened carries its own
      `dtype` and `threshold_bits` (its ULPs are of that dtype: formats.counted_in).
      Issue 15: `options` may hold `grad_output` (the upstream gradient of a `reduction: none`
      point: "random", "onehot", "zeros"; absent for ones, so earlier files keep their keys),
      `spatial` ("100x1025": an (N, C, d…) input), `dim` (log_softmax), `labels` (C of an
      (N, C) multi-label binary input) and a per-label `pos_weight` as the string
      "(0.5, 2, -1)" (options stay strings and numbers); the losses
      `nll_loss` and `log_softmax` (whose `forward` counts every output element).
      Records of the `torch_compile` family carry an optional `compile` object: `seconds`
      (compilation at this point, 0 where earlier points compiled its graphs; kept out of
      `timing`), `graphs` (compiled here), `graph_breaks`, `fallback` (null, or why
      torch.compile would have run it eagerly: the point is then `skipped`) and, only when
      true, `compiled_while_timed` (its timing was dropped).
      A record of a point whose inputs are outside the loss's domain (the `out_of_domain`
      value set: NaN, probabilities beyond [0, 1]) has an optional `out_of_domain` object:
      `reference` (why there is no true value), `elements` (how many elements, rows for
      multi-class losses), `outcome` ("raised", "nan": NaN at every such element, loss and
      gradient, or "number"), and unless it raised `forward_numbers`, `backward_numbers`
      (non-NaN results there; backward null without gradient) and `reduced_nan` (whether
      the mean/sum is NaN; null for reduction "none"). Its `forward`/`backward` score the
      other elements only, and `forward.reduced_ulp` is null. Records of soft binary targets
      and of zero or negative `pos_weight` use the existing `options` (`targets: soft`).
      Losses of several differentiated inputs (linear_cross_entropy: hidden states and
      classifier, issue 19) add `backward_classifier` beside `backward` (dL/dhidden): the
      same metric object, null or absent where not measured; `memory.logits_bytes` (the bytes
      the N × V logits take in the dtype); `options` may hold `hidden` (the hidden size,
      absent: 256), `chunks` (stable's vocabulary chunks, absent: its own choice) and
      `logits_precision` (`float64`: stable's logit GEMMs in float64; absent: `float32`).
      Issue 18 (language-model cross entropy): `options` may hold `z_loss`, `softcap`,
      `masked_vocab` (numbers), `smoothing_convention` (`alpha_v_over_v_minus_1`; absent:
      `alpha_over_k`), and for `sharded_cross_entropy` `shards` and `shard_mistake`; absent
      means the default (OPTION_DEFAULTS).
      Issue 18 (token_logprobs, entropy, kl_div, js_div: losses valued in nats): `forward` gains
      `abs_nats` {`max`, `mean`: over the elements, `reduced`: of the mean/sum, absent for
      reduction none}, the absolute error in nats against the exact values (docs/METRICS.md
      "Absolute error in nats"; inf where a result is NaN or infinite and the value is not);
      kl_div and js_div (a student's and a teacher's logits) add `backward_teacher` beside
      `backward` (d/dstudent), like `backward_classifier`; `options` may hold `direction`
      ("reverse"; absent: forward), `log_target` (true) and `temperature` (absent: 1).
      Issue 18: losses `focal_loss` and `softmax_focal_loss`; `options` may hold `gamma`
      (absent: 2) and `alpha` (absent: −1, no α-weighting). An optional top-level
      `accumulate` list: the config's `accumulate:` section run after the sweep, one object
      per dtype as `losscheck accumulate --json` prints it ({spec, tokens, outcomes}: see
      losscheck/accumulate.py); a merge keeps the first shard's. `config` may hold
      `accumulate` (null: none) and `extra` grids with losses of their own (the run's losses
      are every grid's). Findings of points with a `temperature` give effective scales
      (scale / T) and `evidence.temperature`.

Non-finite numbers (an overflowing loss, an infinite ULP distance) are not valid JSON;
they are written as the strings "inf", "-inf" and "nan" and turned back into floats
when the file is loaded.

A file whose name ends in `.gz` is written gzip-compressed (`save`); `load` recognises
compressed content by its magic bytes whatever the name, so every command reads both.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import gzip
import json
import math
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from . import safeio
from .catalog import REDUCTIONS
from .errors import ResultsError, shorten
from .findings import findings as findings_of, problem as finding_problem
from .formats import FORMATS
from .units import format_bytes

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# A record's sweep key: what matches points across runs (gate), shards (merge), resumes.
KEY_FIELDS = (
    "loss",
    "impl",
    "dtype",
    "device",
    "batch",
    "classes",
    "scale",
    "distribution",
    "reduction",
    "options",
    "time",
)
NUMERIC_SECTIONS = ("forward", "backward", "timing")
# Metric sections only some records have (schema 3: a loss's second differentiated input).
OPTIONAL_SECTIONS = ("backward_classifier", "backward_teacher")
RECORD_KEYS = (*KEY_FIELDS[:2], "kind", *KEY_FIELDS[2:], "status", "message", *NUMERIC_SECTIONS)
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def record_key(record: dict) -> tuple:
    return tuple(_hashable(record.get(f)) for f in KEY_FIELDS)


def _hashable(v):
    # options: a dict of option -> value, compared as its sorted items
    return tuple(sorted(v.items())) if isinstance(v, dict) else v


def make_results(config: dict, environment: dict, records: list[dict], command: str, complete: bool = True) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "complete": complete,
        "environment": environment,
        "config": config,
        "records": records,
        # The causes, derived from the records once here so that every reader (report,
        # scripts, a later gate) gets the same verdicts from the file alone.
        "findings": findings_of(records),
    }


def _encode(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


# The strict-JSON encoding (non-finite floats as "inf", "-inf", "nan") for other writers (probe).
encode = _encode


def dumps(results: dict, compact: bool = False) -> str:
    """The file's text: indented (one key per line, for diffs and readers), or `compact` (no
    indentation: json's C encoder, which `indent` turns off; 2.4x faster on a 17,136-record
    file, 0.36 s against 0.85 s): the partial files written while a sweep runs."""
    if compact:
        return json.dumps(_encode(results), sort_keys=True, allow_nan=False, separators=(",", ":")) + "\n"
    return json.dumps(_encode(results), indent=1, sort_keys=True, allow_nan=False) + "\n"


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write via a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file private (0600); give it the usual mode for new files.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold the lock of the results file `path` (a hidden `.NAME.lock` beside it) while a run
    writes it: a second run writing the same file fails at once (ResultsError, exit 2) instead
    of overwriting the first one's results with its own partial file (issue 16). Creating the
    lock also proves, before any point is run, that the directory can be written. The lock
    file is removed when the run ends; POSIX advisory locking (flock), so runs on one machine
    (or a shared file system that supports it) see each other."""
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ResultsError(f"{path}: cannot write there: {e.__class__.__name__}: {e.strerror or e}") from None
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode("ascii", "replace").strip()
            raise ResultsError(
                f"{path}: another losscheck run is writing it"
                + (f" (pid {other})" if other.isdigit() else "")
                + "; wait for it to finish, or give this run another --out"
            ) from None
        held = True
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        yield
    finally:
        if held:
            lock.unlink(missing_ok=True)  # still held: a run that opened it meanwhile was refused
        os.close(fd)


GZIP_SUFFIX = ".gz"
_GZIP_MAGIC = b"\x1f\x8b"


def is_gzip_name(path: str | Path) -> bool:
    return str(path).endswith(GZIP_SUFFIX)


def beside(path: str | Path, suffix: str) -> Path:
    """The file next to results file `path` with `suffix` for its `.json` / `.json.gz` (or
    other) suffix: `x.json.gz`, ".md" -> `x.md`, not `x.json.md`."""
    p = Path(path)
    for known in (".json.gz", ".json"):
        if p.name.endswith(known) and len(p.name) > len(known):
            return p.with_name(p.name[: -len(known)] + suffix)
    return p.with_suffix(suffix)


def save(results: dict, path: Path, compact: bool = False) -> None:
    """Plain JSON, or gzip-compressed JSON where the name ends in `.gz` (a big sweep's file is
    ~10x smaller); `load` reads either, whatever the name. `compact`: see `dumps`."""
    text = dumps(results, compact)
    if is_gzip_name(path):
        # mtime 0: the same results give the same bytes, as plain JSON does.
        write_atomic(path, gzip.compress(text.encode(), compresslevel=6, mtime=0))
    else:
        write_atomic(path, text)


def _read_text(p: Path) -> str:
    # Regular files only, with a size limit (a symlink to /dev/zero or a FIFO never ends).
    raw = safeio.read_bounded(p, safeio.RESULTS_LIMIT, "results file")
    # By content, not by name: a renamed or downloaded file is read all the same.
    if raw[:2] == _GZIP_MAGIC:
        # Decompressed with the same bound: a few MB of gzip can stand for terabytes.
        unzip = zlib.decompressobj(wbits=31)
        raw = unzip.decompress(raw, safeio.RESULTS_LIMIT + 1)
        if len(raw) > safeio.RESULTS_LIMIT:
            raise safeio.UnsafeInput(
                f"decompresses to more than the {format_bytes(safeio.RESULTS_LIMIT)} a results file may be"
            )
        if not unzip.eof:
            raise EOFError("truncated gzip stream")
    return raw.decode()


def load(path: str | Path) -> dict:
    p = Path(path)
    try:
        data = json.loads(_read_text(p))
    except FileNotFoundError:
        raise ResultsError(f"{path}: file not found") from None
    except safeio.UnsafeInput as e:
        raise ResultsError(f"{path}: {e}") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; EOFError: truncated
        raise ResultsError(f"{path}: cannot read: {e.__class__.__name__}") from None
    except UnicodeDecodeError as e:
        raise ResultsError(f"{path}: cannot read: {e.__class__.__name__}") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of thousands of digits, deep nesting
        raise ResultsError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ResultsError(f"{path}: not a losscheck results file (no schema_version)")
    version = data["schema_version"]
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ResultsError(
            f"{path}: schema_version {version!r} is not supported; "
            f"this losscheck reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    for key in ("environment", "config", "records"):
        if key not in data:
            raise ResultsError(f"{path}: key '{key}' missing")
    if not isinstance(data["records"], list):
        raise ResultsError(f"{path}: key 'records' must be a list")
    for key in ("environment", "config"):
        if not isinstance(data[key], dict):
            raise ResultsError(f"{path}: key '{key}' must be an object")
    if not isinstance(data["config"].get("gate") or {}, dict):
        raise ResultsError(f"{path}: key 'config.gate' must be an object")
    thresholds = data["config"].get("thresholds") or {}
    if not (isinstance(thresholds, dict) and all(k in FORMATS and _is_finite(v) for k, v in thresholds.items())):
        raise ResultsError(f"{path}: key 'config.thresholds' must map dtypes ({', '.join(FORMATS)}) to numbers")
    for i, rec in enumerate(data["records"]):
        if not isinstance(rec, dict):
            raise ResultsError(f"{path}: records[{i}] is not an object")
        if version == 1:
            rec.setdefault("options", {})
            rec.setdefault("time", None)
            rec.setdefault("reduction", "mean")
        missing = [k for k in RECORD_KEYS if k not in rec]
        if missing:
            raise ResultsError(f"{path}: records[{i}] lacks key '{missing[0]}'")
        for section in (*NUMERIC_SECTIONS, *OPTIONAL_SECTIONS):
            values = rec.get(section)
            if isinstance(values, dict):
                rec[section] = {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in values.items()}
                nats = rec[section].get("abs_nats")
                if isinstance(nats, dict):  # forward.abs_nats: {max, mean, reduced}, inf where NaN/±inf
                    rec[section]["abs_nats"] = {
                        k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in nats.items()
                    }
        problem = _record_problem(rec)
        if problem:
            raise ResultsError(f"{path}: records[{i}]: {problem}")
    if "accumulate" in data:
        data["accumulate"] = _accumulate_loaded(path, data["accumulate"])
    if "findings" in data:
        if not isinstance(data["findings"], list):
            raise ResultsError(f"{path}: key 'findings' must be a list")
        for i, f in enumerate(data["findings"]):
            problem = finding_problem(f)
            if problem:
                raise ResultsError(f"{path}: findings[{i}] {problem}")
    else:
        # Files from before findings (schema 1, 2, or early 3): derived from the records,
        # by the same rules as when a file is written.
        data["findings"] = findings_of(data["records"])
    data["schema_version"] = SCHEMA_VERSION
    return data


STATUSES = ("ok", "error", "skipped")
# What an implementation did with a point's out-of-domain inputs (record field `out_of_domain`).
OUT_OF_DOMAIN_OUTCOMES = ("raised", "nan", "number")
METRIC_KEYS = ("n", "max_ulp", "max_bits", "mean_bits", "reduced_ulp", "nan", "inf", "saturated")
TIMING_NUMBERS = ("forward_median_s", "forward_iqr_s", "backward_median_s", "backward_iqr_s")


def _is_number(v) -> bool:
    """A JSON number that is finite as a float (inf/nan come in as floats, allowed by callers)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        float(v)
    except OverflowError:  # an integer beyond float range
        return False
    return True


def _is_finite(v) -> bool:
    return _is_number(v) and math.isfinite(float(v))


KEY_TYPES = (
    ("loss", str),
    ("impl", str),
    ("kind", str),
    ("dtype", str),
    ("device", str),
    ("distribution", str),
    ("message", str),
)
COUNT_KEYS = ("n", "nan", "inf", "saturated")
OPTIONAL_COUNT_KEYS = ("clamped", "underflow")


def _record_problem(rec: dict) -> str | None:
    """What the report and the gate rely on, checked once here (None when fine)."""
    if rec["status"] not in STATUSES:
        return f"status {rec['status']!r} is not one of {', '.join(STATUSES)}"
    for key, kind in KEY_TYPES:
        if not isinstance(rec[key], kind):
            return f"'{key}' must be a {kind.__name__}"
    if rec["dtype"] not in FORMATS:
        return f"dtype {shorten(repr(rec['dtype']), 40)} is not one of {', '.join(FORMATS)}"
    if not (rec["classes"] is None or (type(rec["classes"]) is int and rec["classes"] > 0)):
        return "'classes' must be a positive integer or null"
    if not _is_finite(rec["scale"]) or type(rec["batch"]) is not int or rec["batch"] < 1:
        return "'scale' must be a finite number and 'batch' a positive integer"
    if "index" in rec and type(rec["index"]) is not int:
        return "'index' must be an integer"
    if rec["reduction"] not in REDUCTIONS:
        return f"'reduction' must be one of {', '.join(REDUCTIONS)}"
    if not isinstance(rec["options"], dict) or not all(
        isinstance(k, str) and (isinstance(v, (str, bool)) or _is_finite(v)) for k, v in rec["options"].items()
    ):
        return "'options' must be an object of option -> string, number or boolean (log_target)"
    if not (rec["time"] is None or (type(rec["time"]) is int and rec["time"] > 0)):
        return "'time' must be a positive integer or null"
    mem = rec.get("memory")
    if mem is not None and not (
        isinstance(mem, dict) and type(mem.get("peak_bytes")) is int and isinstance(mem.get("measure"), str)
    ):
        return "'memory' must be null or an object with an integer 'peak_bytes' and a 'measure'"
    ood = rec.get("out_of_domain")
    if ood is not None and not (isinstance(ood, dict) and ood.get("outcome") in OUT_OF_DOMAIN_OUTCOMES):
        return f"'out_of_domain' must be an object whose 'outcome' is one of {', '.join(OUT_OF_DOMAIN_OUTCOMES)}"
    if rec["status"] != "ok":
        return None
    if not _is_finite(rec.get("threshold_bits")):
        return "key 'threshold_bits' missing or not a number"
    for section in ("forward", "backward", *OPTIONAL_SECTIONS):
        values = rec.get(section)
        if section != "forward" and values is None:
            continue  # not measured: a numpy implementation without gradient; a one-input loss
        if not isinstance(values, dict):
            return f"'{section}' must be an object for status ok"
        for key in METRIC_KEYS:
            if key not in values:
                return f"'{section}.{key}' missing"
            v = values[key]
            required = key in COUNT_KEYS or key in ("max_ulp", "max_bits", "mean_bits")
            if key in COUNT_KEYS and not (type(v) is int and v >= 0):
                return f"'{section}.{key}' must be a count"
            if (v is None and required) or not (v is None or _is_number(v)):
                return f"'{section}.{key}' must be a number"
        for key in OPTIONAL_COUNT_KEYS:  # schema 3; absent in older files
            if key in values and not (type(values[key]) is int and values[key] >= 0):
                return f"'{section}.{key}' must be a count"
        # Out-of-domain points have no reduced reference (their inputs have no true loss).
        if section == "forward" and values["reduced_ulp"] is None and rec["reduction"] != "none" and not ood:
            return "'forward.reduced_ulp' must be a number"
    timing = rec["timing"]
    if timing is not None:
        if not isinstance(timing, dict) or not all(_is_finite(timing.get(k)) for k in TIMING_NUMBERS):
            return f"'timing' must be null or an object with numbers {', '.join(TIMING_NUMBERS)}"
        for k, v in timing.items():
            if k.endswith("_times_s"):  # the raw block times (schema 3)
                if not isinstance(v, list) or not all(_is_finite(x) and x >= 0 for x in v):
                    return f"'timing.{k}' must be a list of non-negative numbers"
            elif k.endswith("_s") and not _is_finite(v):
                return f"'timing.{k}' must be a finite number"
        if type(timing.get("threads")) is not int:
            return "'timing.threads' must be an integer"
    return None


# Environment fields that must agree for shards to be merged: they change the numbers.
# The thread count too: reductions are ordered by it, and results differ by an ULP between
# 1 and 2 threads at some points (issue 16).
MERGE_CHECKED = ("torch", "numpy", "python", "losscheck", "threads", "inputs")


def inputs_generator(data: dict) -> str:
    """The generator of a results file's inputs (`environment.inputs`; absent: "numpy")."""
    return data.get("environment", {}).get("inputs") or "numpy"


def same_config(a: dict, b: dict) -> bool:
    """Whether two stored configs describe the same run, whichever schema wrote them (schema
    1-2 files store the former `as_dict` format, see `config.as_input`)."""
    from .config import as_input, config_from_dict  # config imports gate, which imports this module
    from .errors import ConfigError

    try:
        return config_from_dict(as_input(a), "<a>") == config_from_dict(as_input(b), "<a>")
    except ConfigError:  # not a valid config (a damaged file): compare the stored text
        return json.dumps(_encode(a), sort_keys=True) == json.dumps(_encode(b), sort_keys=True)


def _accumulate_loaded(path, value) -> list[dict]:
    """The `accumulate` list with its non-finite numbers back as floats (a NaN loss is what an
    all-padding micro-batch gives); its shape checked as far as the report reads it."""

    def restore(d: dict) -> dict:
        return {k: _NONFINITE.get(v, v) if isinstance(v, str) and k != "convention" else v for k, v in d.items()}

    ok = isinstance(value, list) and all(
        isinstance(r, dict) and isinstance(r.get("spec"), dict) and isinstance(r.get("outcomes"), list)
        and all(isinstance(o, dict) and isinstance(o.get("grad"), dict) for o in r["outcomes"])
        for r in value
    )  # fmt: skip
    if not ok:
        raise ResultsError(f"{path}: key 'accumulate' must be a list of {{spec, tokens, outcomes}} objects")
    return [{**r, "outcomes": [{**restore(o), "grad": restore(o["grad"])} for o in r["outcomes"]]} for r in value]


def merge(parts: list[tuple[str, dict]]) -> dict:
    """Merge the results of shards (or of resumed pieces) of one config into one file.

    Refuses results of different configs or of environments whose versions differ (the
    numbers would not be comparable); a point measured twice is an error too. Records are
    put back in sweep order, so merging every shard gives the file the unsharded run would.
    """
    (first_path, first), rest = parts[0], parts[1:]
    for path, data in rest:
        if not same_config(first["config"], data["config"]):
            raise ResultsError(
                f"{path}: made with another config than {first_path}; only shards of one config can be merged"
            )
        for field in MERGE_CHECKED:
            a, b = first["environment"].get(field), data["environment"].get(field)
            if a != b:
                raise ResultsError(
                    f"{path}: environment '{field}' is {b!r}, {first_path} has {a!r}; "
                    "results of different versions or thread counts cannot be merged"
                )
    shards = [d.get("shard") for _, d in parts]
    given = [s for s in shards if s]
    if given and (len(given) != len(shards) or len({s[1] for s in given}) != 1):
        raise ResultsError(
            "only shards of one split (all --shard I/N with the same N) can be merged; got "
            + ", ".join("unsharded" if not s else f"{s[0]}/{s[1]}" for s in shards)
        )
    seen: dict[tuple, str] = {}
    records = []
    for path, data in parts:
        for r in data["records"]:
            key = record_key(r)
            if key in seen:
                raise ResultsError(f"{path}: point {key} is also in {seen[key]}")
            seen[key] = path
            records.append(r)
    records.sort(key=lambda r: (r.get("index", 0), r["impl"]))
    merged = make_results(
        first["config"],
        first["environment"],
        records,
        " && ".join(d.get("command", "") for _, d in parts),
        complete=all(d.get("complete", True) for _, d in parts),
    )
    if given:
        # Complete only when every shard 1..N is here: a missing shard's points would otherwise
        # be absent from the file and pass any gate that does not look for them.
        n = given[0][1]
        missing = sorted(set(range(1, n + 1)) - {s[0] for s in given})
        merged["missing_shards"] = missing
        merged["complete"] = merged["complete"] and not missing
    merged["environments"] = [d["environment"] for _, d in parts]
    accumulated = [d["accumulate"] for _, d in parts if d.get("accumulate")]
    if accumulated:  # run by the first shard only (bench_run._accumulate)
        merged["accumulate"] = accumulated[0]
    return merged
