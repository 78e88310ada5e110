"""YAML for configs: text -> mapping, refusing a key given twice (PyYAML keeps the last one
silently), and mapping -> text that reads back as the same mapping. Validation is config.py's;
this module knows only YAML (and the one-line `ConfigError` of a bad file)."""

from __future__ import annotations

import collections

import yaml

from . import safeio
from .errors import ConfigError


def read_yaml(text: str, source: str = "<config>"):
    """The document of YAML `text`, or a one-line ConfigError naming `source`, the line and the problem."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except safeio.UnsafeInput as e:
        raise ConfigError(source, "", f"refused: YAML {e}") from None
    except _DuplicateKey as e:
        lines = f"lines {e.first} and {e.second}" if e.first != e.second else f"twice on line {e.first}"
        raise ConfigError(source, e.path, f"duplicate key ({lines})", "each key once") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise ConfigError(source, "", f"invalid YAML{at}: {problem}") from None
    return data


def to_yaml(mapping: dict) -> str:
    """YAML text of a config mapping that reads back as the same mapping: readable Unicode where
    that round-trips, escapes where it does not (YAML reads U+0085, U+2028 and U+2029 as line
    breaks, so a description holding one would come back changed; found by hypothesis)."""
    text = yaml.safe_dump(mapping, sort_keys=False, default_flow_style=None, allow_unicode=True)
    if yaml.safe_load(text) == mapping:
        return text
    return yaml.safe_dump(mapping, sort_keys=False, default_flow_style=None)


class _DuplicateKey(Exception):
    def __init__(self, path: str, first: int, second: int):
        super().__init__(path)
        self.path, self.first, self.second = path, first, second


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML
    silently keeps the last one, so `dtypes:` written twice ran only the second list."""

    def construct_document(self, node):
        safeio.check_yaml_expansion(node)  # before anything expands an alias bomb
        _check_duplicate_keys(self, node)
        return super().construct_document(node)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_duplicate_keys(loader: yaml.SafeLoader, root: yaml.Node) -> None:
    """Raise `_DuplicateKey` for the first mapping (in breadth-first order, so top-level keys
    first) that holds a key twice. Checked on the composed nodes, before PyYAML flattens merge
    keys: a key merged in with `<<: *anchor` and given explicitly too is an override, not a
    duplicate. Iterative, and each node once: aliases may make the node graph cyclic."""
    queue = collections.deque([(root, "")])
    seen: set[int] = set()
    while queue:
        node, path = queue.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            queue.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    queue.append((value_node, path))
                    continue
                # Keys as constructed, so that `1` and `0x1` (or `a` and `"a"`) are one key.
                key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                child = f"{path}.{key}" if path else str(key)
                line = key_node.start_mark.line + 1
                if key is not None:
                    if key in lines:
                        raise _DuplicateKey(child, lines[key], line)
                    lines[key] = line
                queue.append((value_node, child))
