"""Reading what users hand us without letting it take the run down (issue 16 item 5).

* `read_bounded`: only regular files (a symlink to /dev/zero, a FIFO or a directory is
  refused before it is opened: reading the first never ends, opening the second blocks until
  a writer comes), read with a size limit stated in the error.
* `check_yaml_expansion`: YAML aliases can make a 400-byte document stand for millions of
  values (the "billion laughs"): PyYAML shares the aliased objects, so loading is cheap, but
  anything that walks or prints the result — a merge key (`<<: *a`) copies, an error message
  quoting the value — expands it. The composed node graph is measured with memoisation (each
  node once) and refused past a bound, before anything is constructed.
(Error messages quoting a bad value are capped where they are made: `errors.shorten`.)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml

from .units import format_bytes

# A config is a few hundred bytes; the largest shipped one is under 2 KiB.
CONFIG_LIMIT = 1 << 20
# Results of the largest shipped sweep (options) are ~15 MB; a results file past 2 GiB is not
# one losscheck wrote for any sweep this machine could run.
RESULTS_LIMIT = 2 << 30
# What a config may stand for once its aliases are expanded, counted as one per value plus the
# characters of its text: a bound on the memory and on the length of anything printing it. The
# largest shipped config is under 2 000; a config file's own size limit without any alias is
# ~1 M; 4 M leaves room for generated configs and refuses a bomb in microseconds.
YAML_EXPANSION_LIMIT = 1 << 22

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnsafeInput(Exception):
    """What is wrong with a file or document, as the tail of a one-line error (the caller
    prefixes the file name and maps it to its own error type)."""


def check_regular(path: str | Path, what: str = "file") -> os.stat_result:
    """`path`'s stat if it is a regular file (symlinks followed: a link to /dev/zero is judged
    by its target); FileNotFoundError if nothing is there, `UnsafeInput` naming what it is else."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise UnsafeInput(f"is {kind}, not a regular file; a {what} must be a regular file")
    return st


def read_bounded(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file at `path` (symlinks followed), at most `limit` of them.

    Raises FileNotFoundError when there is nothing at `path`, `UnsafeInput` for anything that
    is not a regular file or is larger than `limit`, and OSError for the rest (permissions).
    """
    st = check_regular(path, what)
    if st.st_size > limit:
        raise UnsafeInput(f"is {format_bytes(st.st_size)}, larger than the {format_bytes(limit)} a {what} may be")
    with open(path, "rb") as f:
        # The file may have grown since stat (or be a /proc file whose size reads 0): the
        # bound holds for what is read, not for what stat said.
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafeInput(f"is larger than the {format_bytes(limit)} a {what} may be")
    return data


def check_yaml_expansion(root: yaml.Node | None, limit: int = YAML_EXPANSION_LIMIT) -> None:
    """Raise `UnsafeInput` if the document under `root` stands for more than `limit` (values
    plus characters of scalars) with every alias expanded, or refers to itself through an alias (a recursive document).

    Each distinct node is sized once (an alias is the very node object it names), so the
    check costs the size of the text, not of the expansion. Iterative: a deeply nested
    document must not exhaust Python's recursion limit here either.
    """
    if root is None:
        return
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            own = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0)
            total = own + sum(size[id(c)] for c in _children(node))
            if total > limit:
                raise UnsafeInput(
                    f"aliases expand to more than {limit:,} values and characters "
                    "(a YAML alias bomb?); write the values out, or nest fewer aliases"
                )
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise UnsafeInput("document refers to itself through an alias (it is recursive); a config is a tree")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
