"""YAML config -> a frozen, validated `Config`. Everything is checked here, once.

Every problem raises `ConfigError` naming the file, the key, the bad value and what is
allowed (with the closest allowed spelling when one is close); after this module the core
trusts its inputs. `Config.as_dict()` writes the input format back, so the configuration a
report shows "as run" can be run again.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import NoReturn

from . import accumulate_section, families, safeio
from .catalog import (  # noqa: F401  (BUILTIN_IMPLS: config.<name> for its users)
    BUILTIN_IMPLS,
    DEFAULT_IMPLS,
    EVERY_LOSS_OPTIONS,
    LOGITS_PRECISIONS,
    OPTION_DEFAULTS,
    PRECISIONS,
    REDUCTIONS,
    SHARD_MISTAKES,
    SMOOTHING_CONVENTIONS,
    loss_registry,
)
from .config_axes import (  # noqa: F401  (DIMS, pos_weight_vector, spatial_dims: config.<name> for their users)
    DEVICE_RE,
    DIMS,
    ListChecks,
    pos_weight_vector,
    spatial_dims,
)
from .config_sections import (  # noqa: F401  (CUSTOM_APIS, TIMING_KEYS, ...: config.<name> for their users)
    CUSTOM_APIS,
    CUSTOM_KEYS,
    ISOLATION_MODES,
    TIMING_KEYS,
    CustomSpec,
    TimingConfig,
    _suggest,
    _typename,
    custom_spec,
)
from .config_yaml import read_yaml, to_yaml  # noqa: F401  (to_yaml: config.to_yaml for its users)
from .errors import ConfigError
from .formats import FORMATS
from .gate_policy import GATE_KEYS, GatePolicy, key_help  # noqa: F401  (GATE_KEYS: config.GATE_KEYS for its users)
from .inputs import DISTRIBUTIONS, GRAD_OUTPUTS

# Option of a loss (`Loss.options`) -> the config key sweeping it.
OPTION_AXES = {
    "weight": "weights",
    "pos_weight": "pos_weights",
    "label_smoothing": "label_smoothing",
    "ignored": "ignored",
    "targets": "targets",
    "precision": "precision",
    "spatial": "spatial",
    "dim": "dims",
    "labels": "labels",
    "hidden": "hidden_sizes",
    "chunks": "chunks",
    "logits_precision": "logits_precisions",
    "z_loss": "z_loss",
    "softcap": "softcap",
    "masked_vocab": "masked_vocab",
    "smoothing_convention": "smoothing_conventions",
    "shards": "shards",
    "shard_mistake": "shard_mistakes",
    "direction": "directions",
    "log_target": "log_target",
    "temperature": "temperatures",
    "gamma": "gammas",
    "alpha": "alphas",
}
KL_DIRECTIONS = ("forward", "reverse")  # kl_div: KL(teacher ‖ student), KL(student ‖ teacher)
WEIGHT_KINDS = ("none", "random")
TARGET_KINDS = ("hard", "soft")


@dataclass(frozen=True)
class Config:
    name: str
    losses: tuple[str, ...]
    implementations: tuple[str, ...]
    scales: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    classes: tuple[int, ...]
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]
    distributions: tuple[str, ...]
    seed: int = 0
    description: str = ""
    timing: TimingConfig = field(default_factory=TimingConfig)
    # Breakdown threshold per dtype, in bits lost (METRICS.md: default half the significand).
    thresholds: dict[str, float] = field(default_factory=dict)
    threads: int | None = None
    gate: GatePolicy = field(default_factory=GatePolicy)
    # Option axes (each loss sweeps those it supports, see `option_sets`).
    reductions: tuple[str, ...] = ("mean",)
    weights: tuple[str, ...] = ("none",)
    # A number, or a per-label vector as its option value "(0.5, 2, -1)" (`pos_weight_vector`).
    pos_weights: tuple[float | str, ...] = (1.0,)
    labels: tuple[int, ...] = (1,)  # binary losses: (N, C) multi-label inputs for C > 1
    label_smoothing: tuple[float, ...] = (0.0,)
    ignored: tuple[float, ...] = (0.0,)
    targets: tuple[str, ...] = ("hard",)
    precision: tuple[str, ...] = ("native",)
    sequence_lengths: tuple[int, ...] = (64,)
    # Upstream gradients of `reduction: none` points (sweep.cases), and (N, C, d…) positions
    # as option values ("none", "4x4": see `_spatial`).
    grad_outputs: tuple[str, ...] = ("ones",)
    spatial: tuple[str, ...] = ("none",)
    dims: tuple[int, ...] = (-1,)
    hidden_sizes: tuple[int, ...] = (256,)  # OPTION_DEFAULTS["hidden"]
    chunks: tuple[int, ...] = (0,)  # OPTION_DEFAULTS["chunks"]: the implementation's own choice
    logits_precisions: tuple[str, ...] = ("float32",)  # OPTION_DEFAULTS["logits_precision"]
    # Language-model cross-entropy options (issue 18): see OPTION_DEFAULTS and KEYS.
    z_loss: tuple[float, ...] = (0.0,)
    softcap: tuple[float, ...] = (0.0,)
    masked_vocab: tuple[float, ...] = (0.0,)
    smoothing_conventions: tuple[str, ...] = ("alpha_over_k",)
    shards: tuple[int, ...] = (1,)
    shard_mistakes: tuple[str, ...] = ("none",)
    # kl_div/js_div (losses/kl_div.py): OPTION_DEFAULTS["direction"], ["log_target"], ["temperature"].
    directions: tuple[str, ...] = ("forward",)
    log_target: tuple[bool, ...] = (False,)
    temperatures: tuple[float, ...] = (1.0,)
    # Focal losses: γ values, and α values (−1: no α-weighting); OPTION_DEFAULTS["gamma"/"alpha"].
    gammas: tuple[float, ...] = (2.0,)
    alphas: tuple[float, ...] = (-1.0,)
    custom: tuple[CustomSpec, ...] = ()
    # Seconds one implementation may take to be evaluated at one point (not its timing); None: no limit.
    timeout: float | None = 300.0
    # Where implementations run: "auto" (custom ones in a worker process, built-ins in this
    # one), "process" (all in workers) or "none" (all here); see worker.py.
    isolation: str = "auto"
    # Further grids of the run (`extra:`): per grid, the fields it replaces (see `sweeps`).
    extra: tuple[dict, ...] = ()
    # Gradient accumulation run after the sweep (accumulate_section.validate: every key), or None.
    accumulate: dict | None = None
    source: str = "<config>"

    @classmethod
    def from_mapping(cls, data, source: str = "<mapping>") -> Config:
        """A validated config from a Python mapping of the YAML keys (lists may be tuples), with
        the checks and one-line `ConfigError`s of a YAML file: what code builds, no YAML text."""
        return config_from_dict(data, source)

    def threshold_bits(self, dtype: str) -> float:
        return self.thresholds.get(dtype, FORMATS[dtype].default_threshold_bits)

    def impls_for(self, loss: str) -> tuple[str, ...]:
        """The implementations run for `loss`: the built-in ones, then the custom ones for it."""
        return self.implementations + tuple(c.name for c in self.custom if c.applies(loss))

    def option_sets(self, loss: str) -> list[dict]:
        """The option combinations swept for `loss`: the product of the axes of the options
        it supports, each as a dict of the values that differ from the default (soft
        targets with ignored ones are left out: torch ignores only class indices)."""
        names = [o for o in loss_registry()[loss].options + EVERY_LOSS_OPTIONS if o in OPTION_AXES]
        out = []
        for values in itertools.product(*(getattr(self, OPTION_AXES[o]) for o in names)):
            opts = {o: v for o, v in zip(names, values, strict=True) if v != OPTION_DEFAULTS[o]}
            if opts.get("targets") == "soft" and opts.get("ignored"):
                continue
            pw = opts.get("pos_weight")
            if isinstance(pw, str) and len(pos_weight_vector(pw)) != opts.get("labels", 1):
                continue  # a per-label vector goes with inputs of as many labels only
            out.append(opts)
        return out

    def sweeps(self) -> list[Config]:
        """The grids the run sweeps: this config's, then one per `extra` mapping (its keys
        replaced). An extra grid may name any loss (`run_losses`: the union)."""
        return [self] + [replace(self, **over, extra=()) for over in self.extra]

    @property
    def run_losses(self) -> tuple[str, ...]:
        """The losses of the run: every grid's, in order of first appearance. Whatever is per
        loss (implementations, reports, the gate) is over these, not only the main grid's."""
        return tuple(dict.fromkeys(name for grid in self.sweeps() for name in grid.losses))

    def only(self, losses) -> Config:
        """The run restricted to `losses` in every grid (`bench --loss`), grids left without
        one dropped. When the main grid is, the first kept extra grid becomes the main one, and
        the later ones state the keys it changed (an unset key of an extra grid is the main
        grid's): the result is a valid config, as the results file stores it."""
        kept = []
        for over in ({}, *self.extra):
            names = tuple(name for name in over.get("losses", self.losses) if name in losses)
            if names:
                kept.append({**over, "losses": names})
        if not kept:
            raise ValueError(f"none of {list(losses)} is among the run's losses")
        head, rest = kept[0], kept[1:]
        return replace(self, **head, extra=tuple({**{k: getattr(self, k) for k in head}, **o} for o in rest))

    def all_impls(self) -> tuple[str, ...]:
        """Every implementation of the run: the built-in ones, then every custom one."""
        return self.implementations + tuple(c.name for c in self.custom)

    def as_dict(self) -> dict:
        """The config in the input format (plain lists and mappings, no `source`): what the
        results file stores and the report prints "as run", and what `config_from_dict` or
        `parse_config` of its YAML turn back into an equal config."""
        t = self.timing
        return {
            "name": self.name,
            "description": self.description,
            "losses": list(self.losses),
            "implementations": list(self.implementations),
            "scales": list(self.scales),
            "batch_sizes": list(self.batch_sizes),
            "classes": list(self.classes),
            "dtypes": list(self.dtypes),
            "devices": list(self.devices),
            "distributions": list(self.distributions),
            "seed": self.seed,
            "timing": {
                "enabled": t.enabled,
                "min_run_time": t.min_run_time,
                "distributions": list(t.distributions),
                "scales": list(t.scales),
            },
            "thresholds": dict(self.thresholds),
            "threads": self.threads,
            "gate": _gate_as_input(self.gate, self.all_impls()),
            "reductions": list(self.reductions),
            "weights": list(self.weights),
            "pos_weights": [pos_weight_vector(p) if isinstance(p, str) else p for p in self.pos_weights],
            "labels": list(self.labels),
            "label_smoothing": list(self.label_smoothing),
            "ignored": list(self.ignored),
            "targets": list(self.targets),
            "precision": list(self.precision),
            "sequence_lengths": list(self.sequence_lengths),
            "grad_outputs": list(self.grad_outputs),
            "spatial": [spatial_dims(s) for s in self.spatial],
            "dims": list(self.dims),
            "hidden_sizes": list(self.hidden_sizes),
            "chunks": list(self.chunks),
            "logits_precisions": list(self.logits_precisions),
            "z_loss": list(self.z_loss),
            "softcap": list(self.softcap),
            "masked_vocab": list(self.masked_vocab),
            "smoothing_conventions": list(self.smoothing_conventions),
            "shards": list(self.shards),
            "shard_mistakes": list(self.shard_mistakes),
            "directions": list(self.directions),
            "log_target": list(self.log_target),
            "temperatures": list(self.temperatures),
            "gammas": list(self.gammas),
            "alphas": list(self.alphas),
            "custom": [
                {"name": c.name, "function": c.function, "losses": list(c.losses), "api": c.api} for c in self.custom
            ],
            "timeout": self.timeout,
            "isolation": self.isolation,
            "extra": [self._extra_as_input(over) for over in self.extra],
            "accumulate": None if self.accumulate is None else dict(self.accumulate),
        }

    def _extra_as_input(self, over: dict) -> dict:
        grid = replace(self, **over, extra=()).as_dict()
        return {k: grid[k] for k in over}


def _gate_as_input(policy: GatePolicy, impls: tuple[str, ...]) -> dict:
    """`gate:` as written in a config: every threshold at top level, and under `losses` only
    what each loss overrides (an override equal to the default is kept as an empty mapping)."""
    gate = asdict(policy.default)
    # The default `versus` (torch) is not checked against the run, an explicit one is: when
    # torch is not run, writing the default out would make the as-run config invalid input.
    if gate["versus"] not in impls:
        del gate["versus"]
    defaults = asdict(policy.default)
    gate["losses"] = {
        loss: {k: v for k, v in asdict(t).items() if v != defaults[k]} for loss, t in policy.per_loss.items()
    }
    return gate


def as_input(stored: dict) -> dict:
    """A results file's `config`, whichever schema wrote it, in the input format.

    Schema 1 and 2 files hold the former `as_dict` (every dataclass field, the gate as
    `{default: {...}, per_loss: {loss: {...}}}`, per-loss thresholds in full); schema 3 files
    hold the input format already. Anything else is returned as it is, for the validator (or
    the report, which prints it) to deal with.
    """
    out = {k: v for k, v in stored.items() if k != "source"}
    gate = out.get("gate")
    if isinstance(gate, dict) and ("default" in gate or "per_loss" in gate):
        stored_default, stored_per_loss = gate.get("default"), gate.get("per_loss")
        default: dict = stored_default if isinstance(stored_default, dict) else {}
        per_loss: dict = stored_per_loss if isinstance(stored_per_loss, dict) else {}
        out["gate"] = {
            **default,
            "losses": {
                loss: {k: v for k, v in t.items() if k not in default or default[k] != v} if isinstance(t, dict) else t
                for loss, t in per_loss.items()
            },
        }
    return out


def gate_policy(data: dict, source: str = "<results>") -> GatePolicy:
    """The gate policy of an input-format mapping (see `as_input`), validated as a config's
    `gate:` is. `versus` is not checked against the implementations here: a stored config
    was checked when it was run."""
    return _Validator(source).gate(data, None)


KEYS = {
    "name": "a name for the run (used for the output file names)",
    "description": "free text shown in the report",
    "losses": "list of losses",
    "implementations": "list of implementations",
    "scales": "list of positive logit magnitudes",
    "batch_sizes": "list of positive integers",
    "classes": "list of integers >= 2 (multi-class losses only)",
    "dtypes": "list of dtypes",
    "devices": "list of devices",
    "distributions": "list of input distributions",
    "seed": "non-negative integer",
    "timing": "mapping with enabled, min_run_time, distributions, scales",
    "thresholds": "mapping dtype -> bits lost at which a point counts as broken",
    "threads": "positive integer: CPU threads for the implementations and timing",
    "gate": key_help(),
    "reductions": "list of none, mean, sum",
    "weights": "list of none, random (per-element weights for binary losses, per-class for cross entropy)",
    "pos_weights": "list of finite numbers, zero and negative ones too, or of lists of them: one per label of "
    "(N, C) multi-label inputs, as long as a `labels` value (binary losses; 1 means unset)",
    "labels": "list of positive integers: labels per row of (N, C) multi-label binary inputs (1: the flat (N,) "
    "input; N is the batch size)",
    "label_smoothing": "list of numbers in [0, 1] (cross entropy)",
    "ignored": "list of fractions in [0, 1]: share of targets set to ignore_index (cross_entropy)",
    "targets": "list of hard, soft (cross_entropy: class indices or class probabilities; "
    "binary losses: 0/1 labels or soft labels 0.9·y + 0.1·U(0, 1))",
    "precision": "list of native, autocast, upcast (float16/bfloat16 points: the loss as given, under "
    "torch.autocast, on a float32 upcast)",
    "sequence_lengths": "list of positive integers (sequence_cross_entropy: tokens per sequence)",
    "grad_outputs": f"list of {', '.join(GRAD_OUTPUTS)}: upstream gradients of reduction none points",
    "spatial": "list of lists of positive integers: the d1, d2, … of (N, C, d1, d2, …) inputs ([] for (N, C))",
    "dims": "list of -1, 0: the dimension of log_softmax (-1: (N, C) rows; 0: the same rows as columns of (C, N))",
    "hidden_sizes": "list of positive integers (linear_cross_entropy: hidden size H; default [256])",
    "chunks": "list of integers >= 0 (linear_cross_entropy: vocabulary chunks of chunked implementations; "
    "0: their own choice)",
    "logits_precisions": "list of float32, float64 (linear_cross_entropy: the dtype of stable's logit GEMMs; "
    "default [float32])",
    "z_loss": "list of numbers >= 0 (cross entropy: λ of the z-loss λ·logsumexp², 0: none)",
    "softcap": "list of numbers >= 0 (cross entropy: the cap c of c·tanh(x/c) on finite logits, 0: none)",
    "masked_vocab": "list of numbers >= 0 (cross entropy: vocabulary entries set to -inf, a share < 1 or "
    "a whole count >= 1 below every `classes`)",
    "smoothing_conventions": "list of alpha_over_k, alpha_v_over_v_minus_1 (label smoothing: torch's α/V, "
    "or the target 1 − α and α/(V − 1) elsewhere)",
    "shards": "list of positive integers (sharded_cross_entropy: vocabulary shards, any count)",
    "shard_mistakes": f"list of {', '.join(SHARD_MISTAKES)} (sharded_cross_entropy: a known mistake "
    "the naive implementation makes, none by default)",
    "directions": "list of forward, reverse (kl_div: KL(teacher ‖ student), KL(student ‖ teacher))",
    "log_target": "list of false, true (kl_div: the torch implementation gets the target as log-probabilities)",
    "temperatures": "list of positive finite numbers (kl_div, js_div: softmax(logits / T); default [1])",
    "gammas": "list of numbers >= 0 (focal losses: the focusing exponent γ; default [2])",
    "alphas": "list of numbers in [0, 1], or -1 for no α-weighting (focal losses; default [-1])",
    "custom": "list of mappings {name, function: 'module:function' or 'file.py:function', losses, api: torch|numpy}",
    "timeout": "seconds one implementation may take at one point, or null for no limit",
    "isolation": "auto (custom implementations in a worker process), process (all), none (all in this process)",
    "extra": "list of mappings, each a further grid of the run: grid keys replacing the config's "
    "(e.g. one large vocabulary at a small batch, or other losses: the run's losses are every grid's)",
    "accumulate": accumulate_section.HELP,
}
# The keys an `extra` grid may set: the axes of the points. Implementations, seed, timing,
# thresholds and the gate are the run's, shared by its grids.
EXTRA_KEYS = (
    "losses", "scales", "batch_sizes", "classes", "dtypes", "devices", "distributions", "reductions", "weights",
    "pos_weights", "labels", "label_smoothing", "ignored", "targets", "precision", "sequence_lengths",
    "grad_outputs", "spatial", "dims", "hidden_sizes", "chunks", "logits_precisions", "z_loss", "softcap",
    "masked_vocab", "smoothing_conventions", "shards", "shard_mistakes", "directions", "log_target",
    "temperatures", "gammas", "alphas",
)  # fmt: skip
DEFAULTS = {"classes": (10,), "devices": ("cpu",), "seed": 0, "implementations": DEFAULT_IMPLS}


def default_config_text() -> str:
    return resources.files("losscheck").joinpath("configs/default.yaml").read_text()


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate a YAML config; `None` means the embedded default."""
    if path is None:
        return parse_config(default_config_text(), "<embedded default.yaml>")
    try:
        text = safeio.read_bounded(path, safeio.CONFIG_LIMIT, "config").decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except safeio.UnsafeInput as e:  # /dev/zero, a FIFO, a directory, 2 GB of YAML
        raise ConfigError(str(path), "", str(e)) from None
    # Any OSError, not just these: e.g. NotADirectoryError ("file.yaml/x") escaped as a traceback.
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), "", f"cannot read: {e.__class__.__name__}") from None
    return parse_config(text, str(path))


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate a config given as YAML text; `source` names it in error messages."""
    return config_from_dict(read_yaml(text, source), source)


def config_from_dict(data, source: str = "<config>") -> Config:
    """Validate a config given as an already-parsed mapping (what `parse_config` makes of the
    YAML, or `Config.as_dict()`): code holding a dict need not write YAML. Lists may be tuples."""
    if not isinstance(data, dict):
        raise ConfigError(
            source, "", f"expected a mapping of keys at top level, got {_typename(data)}", ", ".join(KEYS)
        )
    return _build(data, source)


def _build(data: dict, source: str) -> Config:
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ConfigError(source, str(unknown[0]), "unknown key" + _suggest(unknown[0], KEYS), ", ".join(KEYS))
    for required in ("name", "losses", "scales", "batch_sizes", "dtypes", "distributions"):
        if required not in data:
            raise ConfigError(source, required, "missing", KEYS[required])
    v = _Validator(source)
    name = v.string(data, "name")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(source, "name", f"{name!r} is not usable as a file name", "letters, digits, '_', '.', '-'")
    cfg = Config(
        name=name,
        description=v.string(data, "description", ""),
        losses=v.choices(data, "losses", tuple(loss_registry())),
        implementations=v.choices(data, "implementations", families.names(), DEFAULTS["implementations"]),
        scales=v.numbers(data, "scales", positive=True),
        batch_sizes=v.ints(data, "batch_sizes", minimum=1),
        classes=v.ints(data, "classes", minimum=2, default=DEFAULTS["classes"]),
        dtypes=v.choices(data, "dtypes", tuple(FORMATS)),
        devices=v.devices(data, DEFAULTS["devices"]),
        distributions=v.choices(data, "distributions", DISTRIBUTIONS),
        # minimum 0: numpy's seeding rejects negative seeds, which used to crash the sweep
        # with a traceback in inputs.rng_for instead of failing here (found by tests/test_config.py).
        seed=v.integer(data, "seed", DEFAULTS["seed"], minimum=0),
        timing=v.timing(data),
        thresholds=v.thresholds(data),
        threads=v.integer(data, "threads", None, minimum=1),
        reductions=v.choices(data, "reductions", REDUCTIONS, ("mean",)),
        weights=v.choices(data, "weights", WEIGHT_KINDS, ("none",)),
        # Zero and negative too: torch takes any finite pos_weight (a zero one removes the
        # positive term; a negative one makes it a reward).
        pos_weights=v.pos_weights(data),
        labels=v.ints(data, "labels", minimum=1, default=(1,)),
        label_smoothing=v.numbers(data, "label_smoothing", default=(0.0,), maximum=1.0),
        ignored=v.numbers(data, "ignored", default=(0.0,), maximum=1.0),
        targets=v.choices(data, "targets", TARGET_KINDS, ("hard",)),
        precision=v.choices(data, "precision", PRECISIONS, ("native",)),
        sequence_lengths=v.ints(data, "sequence_lengths", minimum=1, default=(64,)),
        grad_outputs=v.choices(data, "grad_outputs", GRAD_OUTPUTS, ("ones",)),
        spatial=v.spatial(data),
        dims=v.dims(data),
        hidden_sizes=v.ints(data, "hidden_sizes", minimum=1, default=(OPTION_DEFAULTS["hidden"],)),
        chunks=v.ints(data, "chunks", minimum=0, default=(OPTION_DEFAULTS["chunks"],)),
        logits_precisions=v.choices(
            data, "logits_precisions", LOGITS_PRECISIONS, (OPTION_DEFAULTS["logits_precision"],)
        ),
        z_loss=v.numbers(data, "z_loss", default=(0.0,)),
        softcap=v.numbers(data, "softcap", default=(0.0,)),
        masked_vocab=v.masked_vocab(data),
        smoothing_conventions=v.choices(data, "smoothing_conventions", SMOOTHING_CONVENTIONS, ("alpha_over_k",)),
        shards=v.ints(data, "shards", minimum=1, default=(1,)),
        shard_mistakes=v.choices(data, "shard_mistakes", SHARD_MISTAKES, ("none",)),
        directions=v.choices(data, "directions", KL_DIRECTIONS, ("forward",)),
        log_target=v.booleans(data, "log_target", (False,)),
        temperatures=v.numbers(data, "temperatures", positive=True, default=(1.0,)),
        gammas=v.numbers(data, "gammas", default=(OPTION_DEFAULTS["gamma"],)),
        alphas=v.alphas(data),
        custom=v.custom(data),
        timeout=v.timeout(data),
        isolation=v.isolation(data),
        source=source,
    )
    for p in cfg.pos_weights:
        if isinstance(p, str) and len(pos_weight_vector(p)) not in cfg.labels:
            v.fail(
                "pos_weights",
                f"the vector {p} has {len(pos_weight_vector(p))} values, which is no `labels` value "
                f"({', '.join(map(str, cfg.labels))})",
                "one value per label: a list as long as a `labels` value",
            )
    # The gate last: `versus` must name one of the run's implementations, custom ones included.
    cfg = replace(cfg, gate=v.gate(data, cfg))
    if data.get("accumulate") is not None:  # null: none (what as_dict writes for none)
        cfg = replace(cfg, accumulate=accumulate_section.validate(data["accumulate"], source, cfg.dtypes, cfg.seed))
    return replace(cfg, extra=_extra(data, cfg)) if "extra" in data else cfg


def _extra(data: dict, cfg: Config) -> tuple[dict, ...]:
    """`extra:` validated: each mapping is checked as the config with its keys replaced."""
    items, source = data["extra"], cfg.source
    if not isinstance(items, (list, tuple)):
        raise ConfigError(source, "extra", f"expected a list of mappings, got {_typename(items)}", KEYS["extra"])
    out = []
    for i, item in enumerate(items):
        where = f"extra[{i}]"
        if not isinstance(item, dict) or not item:
            raise ConfigError(source, where, f"expected a non-empty mapping, got {item!r}", ", ".join(EXTRA_KEYS))
        bad = [k for k in item if k not in EXTRA_KEYS]
        if bad:
            problem = "not a grid key" + _suggest(str(bad[0]), EXTRA_KEYS)
            raise ConfigError(source, f"{where}.{bad[0]}", problem, ", ".join(EXTRA_KEYS))
        try:
            grid = _build({**{k: v for k, v in data.items() if k != "extra"}, **item}, source)
        except ConfigError as e:
            raise ConfigError(source, f"{where}.{e.key}" if e.key else where, e.problem, e.allowed) from None
        out.append({k: getattr(grid, k) for k in item})
    return tuple(out)


class _Validator(ListChecks):
    """The checks of every top-level key (lists in config_axes.ListChecks, the sections' in
    config_sections.SectionChecks)."""

    keys = KEYS

    def __init__(self, source: str):
        self.source = source

    def fail(self, key, problem, allowed=None) -> NoReturn:
        # Fall back to the key's description so that every message says what is allowed
        # (the module's contract); `string`/`integer` failures used to omit it.
        raise ConfigError(self.source, key, problem, allowed or KEYS.get(key))

    def string(self, data, key, default=None):
        value = data.get(key, default)
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_typename(value)} {value!r}")
        return value

    def integer(self, data, key, default, minimum=None):
        value = data.get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {_typename(value)} {value!r}")
        if minimum is not None and value < minimum:
            self.fail(key, f"{value} is below the minimum {minimum}")
        return value

    def masked_vocab(self, data):
        """Shares < 1 or whole counts >= 1, each below every vocabulary size (`classes`)."""
        out = self.numbers(data, "masked_vocab", default=(0.0,))
        smallest = min(self.ints(data, "classes", minimum=2, default=DEFAULTS["classes"]))
        for value in out:
            if value >= 1 and (value != int(value) or value >= smallest):
                self.fail("masked_vocab", f"bad value {value!r}", f"a share < 1, or a whole count below {smallest}")
        return out

    def spatial(self, data):
        allowed = KEYS["spatial"]
        out = []
        for value in self._list(data, "spatial", [[]]):
            if not isinstance(value, (list, tuple)) or not all(type(d) is int and d >= 1 for d in value):
                self.fail("spatial", f"bad value {value!r}", allowed)
            out.append("x".join(map(str, value)) or "none")
        if len(set(out)) != len(out):
            self.fail("spatial", f"duplicate values in {data['spatial']!r}", "each value at most once")
        return tuple(out)

    def alphas(self, data):
        values = self.numbers(data, "alphas", signed=True, default=(OPTION_DEFAULTS["alpha"],))
        for value in values:
            if value != -1 and not 0 <= value <= 1:
                self.fail("alphas", f"bad value {value!r}", KEYS["alphas"])
        return values
