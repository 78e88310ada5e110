"""Shared fixtures: a CliRunner, a tiny sweep config, and that sweep's results (run once)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from losscheck import config as C
from losscheck import environment, results, sweep

# Every loss, implementation and two dtypes at two scales: about a second on CPU.
# Scale 100 is where the naive forms overflow (float16 and float32); cuda points are
# skipped where CUDA is absent and run where it is present.
TINY = {
    "name": "tiny",
    "description": "Tiny sweep for the tests.",
    "losses": ["bce", "bce_with_logits", "cross_entropy"],
    "implementations": ["naive", "stable", "torch"],
    "scales": [1, 100],
    "batch_sizes": [64],
    "classes": [5],
    "dtypes": ["float32", "float16"],
    "devices": ["cpu", "cuda"],
    "distributions": ["normal", "extreme"],
    "seed": 0,
    "timing": {"min_run_time": 0.001, "scales": [1]},
}
# The same config as a YAML file's text, for the tests of the command line (which reads files,
# and whose tests edit that text); `to_yaml` writes lists inline and `timing:` as a block.
TINY_CONFIG = C.to_yaml(TINY)


@pytest.fixture
def runner() -> CliRunner:
    # click >= 8.2 keeps stderr apart: result.stdout / result.stderr.
    return CliRunner()


@pytest.fixture(scope="session")
def tiny_config_text() -> str:
    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_results(tmp_path_factory) -> dict:
    """The tiny sweep run once in-process, stored and loaded back as `losscheck report` would."""
    cfg = C.Config.from_mapping(TINY, "tiny.yaml")
    threads = torch.get_num_threads()
    records = sweep.run(cfg, threads)
    data = results.make_results(cfg.as_dict(), environment.capture(threads), records, "pytest tiny")
    # Through the file format (results.dumps via save, then load): non-finite values are
    # written as strings and come back as floats, exactly what `losscheck report` sees.
    path = tmp_path_factory.mktemp("tiny") / "tiny.json"
    results.save(data, path)
    return results.load(path)
