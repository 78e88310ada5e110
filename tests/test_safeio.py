"""Hostile files and documents (issue 16 item 5): YAML alias bombs, /dev/zero, FIFOs,
oversized files, recursive documents and megabyte values quoted in errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from losscheck import config as C
from losscheck import safeio
from losscheck.errors import ConfigError, shorten

# Nine-fold alias nesting under keys the config knows: scales stands for 9**7 = 4.8 M strings.
LAUGHS = textwrap.dedent("""\
    name: bomb
    losses: [bce]
    description: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    dtypes: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    devices: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    classes: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    batch_sizes: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    seed: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    scales: [*f,*f,*f,*f,*f,*f,*f,*f,*f]
""")
# Merge keys copy: PyYAML's flatten_mapping builds every level's key list in memory.
MERGES = textwrap.dedent("""\
    name: bomb
    losses: [bce]
    description: &x0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}
    timing: &x1 {<<: *x0, k1: *x0, k2: *x0, k3: *x0, k4: *x0, k5: *x0, k6: *x0}
    gate: &x2 {<<: *x1, m1: *x1, m2: *x1, m3: *x1, m4: *x1, m5: *x1, m6: *x1}
    thresholds: &x3 {<<: *x2, n1: *x2, n2: *x2, n3: *x2, n4: *x2, n5: *x2, n6: *x2}
    weights: &x5 {<<: *x3, o1: *x3, o2: *x3, o3: *x3, o4: *x3, o5: *x3, o6: *x3}
    custom: &x4 [*x5, *x5, *x5, *x5, *x5, *x5, *x5, *x5, *x5, *x5, *x5, *x5]
    seed: [*x4, *x4, *x4, *x4, *x4, *x4, *x4, *x4, *x4, *x4, *x4, *x4]
""")


@pytest.mark.parametrize("text", [LAUGHS, MERGES], ids=["laughs", "merge-keys"])
def test_yaml_bombs_are_refused_at_once_in_one_short_line(text):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        C.parse_config(text, "bomb.yaml")
    elapsed = time.perf_counter() - start
    message = str(e.value)
    # Refused before expanding: well under the minutes (and GiBs) an expansion would take, with
    # room for a loaded CI runner (no tight timing in unit tests).
    assert elapsed < 10.0, elapsed
    assert len(message) < 300 and "\n" not in message, message
    assert message.startswith("bomb.yaml: refused: YAML aliases expand to more than")


def test_the_expansion_is_measured_not_guessed():
    # The same shape, one level less (9**5 = 59 049 strings of 3 characters + lists): under
    # the bound, so the document is loaded and judged by its keys as any other.
    lines = LAUGHS.splitlines()
    fewer = "\n".join(lines[:7] + ["scales: *e"]) + "\n"
    node = yaml.compose(fewer)
    safeio.check_yaml_expansion(node)  # no error
    with pytest.raises(safeio.UnsafeInput):
        safeio.check_yaml_expansion(node, limit=59_049 * 4)


def test_aliases_in_ordinary_use_still_work():
    text = ("name: ok\nlosses: [bce]\nscales: &s [1, 10]\nbatch_sizes: [8]\ndistributions: [normal]\ndtypes: [float32]\n"
            "timing: {enabled: true, scales: *s}\n")
    cfg = C.parse_config(text, "ok.yaml")
    assert list(cfg.scales) == [1, 10] and list(cfg.timing.scales) == [1, 10]


def test_a_recursive_document_is_refused():
    with pytest.raises(ConfigError, match="refers to itself through an alias"):
        C.parse_config("name: ok\nlosses: [bce]\nscales: &s [1, *s]\n", "loop.yaml")


def test_a_huge_quoted_value_is_cut_in_the_message():
    values = ", ".join(map(str, range(200_000)))
    with pytest.raises(ConfigError) as e:
        C.parse_config(f"name: long\nlosses: [bce]\nscales: [1]\nbatch_sizes: [8]\ndistributions: [normal]\ndtypes: [float32]\nseed: [{values}]\n", "long.yaml")
    message = str(e.value)
    assert len(message) < 400 and "characters)" in message, message[:500]
    assert message.startswith("long.yaml: key 'seed': expected an integer, got a list [0, 1, 2")


def test_shorten_says_how_long_it_was():
    assert shorten("abc", 5) == "abc"
    assert shorten("x" * 10, 4) == "xxxx… (10 characters)"


def test_dev_zero_behind_a_symlink_is_refused(tmp_path):
    link = tmp_path / "config.yaml"
    link.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="is a character device, not a regular file"):
        C.load_config(link)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        C.load_config(tmp_path)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    # Opening a FIFO for reading blocks until a writer comes: run it in a child with a timeout
    # so that a regression fails the test instead of hanging the suite.
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    code = ("import sys; from losscheck import config\n"
            "try:\n    config.load_config(sys.argv[1])\n"
            "except Exception as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60)
    assert "is a FIFO (named pipe), not a regular file" in out.stdout, out


def test_an_oversized_config_is_refused_with_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(safeio, "CONFIG_LIMIT", 1024)
    path = tmp_path / "big.yaml"
    path.write_text("losses: [bce]\n" + "# padding\n" * 200)
    with pytest.raises(ConfigError, match=r"is 1.97 KiB, larger than the 1 KiB a config may be"):
        C.load_config(path)


def test_read_bounded_holds_for_files_that_grow(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert safeio.read_bounded(path, 10) == b"x" * 10
    with pytest.raises(safeio.UnsafeInput):
        safeio.read_bounded(path, 9)


def test_results_files_are_bounded_too(tmp_path, monkeypatch):
    import gzip
    import json

    from losscheck import results
    from losscheck.errors import ResultsError

    link = tmp_path / "r.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(ResultsError, match="is a character device, not a regular file"):
        results.load(link)
    # A gzip bomb: 1 MiB of zeros compresses to ~1 KiB, under the file limit but not its contents'.
    bomb = tmp_path / "bomb.json.gz"
    bomb.write_bytes(gzip.compress(b"0" * (1 << 20)))
    monkeypatch.setattr(safeio, "RESULTS_LIMIT", 64 << 10)
    with pytest.raises(ResultsError, match="decompresses to more than the 64 KiB a results file may be"):
        results.load(bomb)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"schema_version": 3, "pad": "x" * (65 << 10)}))
    with pytest.raises(ResultsError, match="larger than the 64 KiB a results file may be"):
        results.load(big)


def test_probe_files_must_be_regular_files(tmp_path):
    from losscheck.probing.load import ProbeError, load_array

    link = tmp_path / "x.npy"
    link.symlink_to("/dev/zero")
    with pytest.raises(ProbeError, match="x.npy: is a character device, not a regular file"):
        load_array(str(link))
    fifo = tmp_path / "f.npy"
    os.mkfifo(fifo)
    with pytest.raises(ProbeError, match="is a FIFO"):
        load_array(str(fifo))  # refused by stat, before any open could block
    with pytest.raises(ProbeError, match="file not found"):
        load_array(str(tmp_path / "missing.npy"))


@pytest.mark.parametrize("depth", [9, 2000, 50_000])
def test_a_deeply_nested_probe_list_is_one_line(depth):
    from click.testing import CliRunner

    from losscheck.cli import main

    text = "[" * depth + "1" + "]" * depth
    result = CliRunner().invoke(main, ["probe", "bce_with_logits", "--input", text, "--target", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr, result.stderr[-500:]
    assert f"lists nested {depth} deep" in result.stderr
