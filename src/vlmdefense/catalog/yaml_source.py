"""Safe YAML loading that remembers the line of every key and list item.

Only YAML's standard tags are accepted (``yaml.SafeLoader``): a tag that would construct a Python
object is rejected as an error, never executed. Duplicate keys are errors too.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmdefense.problems import Problem, ProblemsError, display_path

Loc = tuple[str | int, ...]


@dataclass
class YamlDocument:
    """A parsed YAML mapping plus the 1-based line of every location in it."""

    path: Path
    data: dict[str, Any]
    lines: dict[Loc, int] = field(default_factory=dict)
    numbers_as_text: dict[Loc, str] = field(default_factory=dict)

    def with_text_at(self, locs: list[Loc]) -> dict[str, Any]:
        """A copy of the data where the numbers at ``locs`` are replaced by their source text.

        YAML reads ``arxiv: 2212.07010`` as the float 2212.0701; a string field wants the text.
        """
        data: Any = copy.deepcopy(self.data)
        for loc in locs:
            target = data
            for part in loc[:-1]:
                target = target[part]
            target[loc[-1]] = self.numbers_as_text[loc]
        return data

    def line_of(self, loc: Loc) -> int:
        """Line of ``loc``, or of its nearest enclosing location that has one."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return 1

    def problem(self, loc: Loc, message: str) -> Problem:
        """A :class:`Problem` located at ``loc`` in this document."""
        return Problem(display_path(self.path), self.line_of(loc), format_loc(loc), message)


def format_loc(loc: Loc) -> str:
    """``("reported", 2, "eps")`` → ``reported[2].eps``; an empty location → ``-``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "-"


# YAML 1.2's booleans only: YAML 1.1 also reads yes/no/on/off (any case) as booleans, which would let
# ``randomized: off`` pass a strict boolean field, and turn a key named ``on`` into ``True``.
_BOOL_TAG = "tag:yaml.org,2002:bool"
_YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads only ``true``/``false`` as booleans."""

    yaml_implicit_resolvers = {  # noqa: RUF012 (PyYAML's resolver table is a class attribute)
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


for _first in "tTfF":
    _StrictSafeLoader.add_implicit_resolver(_BOOL_TAG, _YAML12_BOOL, [_first])

_KEY_ON_LINE = re.compile(r"^\s*(?:-\s+)?([A-Za-z_][\w-]*)\s*:")


def _key_on_line(text: str, line: int) -> str:
    """The mapping key written on ``line`` (1-based) of ``text``, or ``-``."""
    lines = text.splitlines()
    match = _KEY_ON_LINE.match(lines[line - 1]) if 0 < line <= len(lines) else None
    return match.group(1) if match else "-"


_NUMBER_TAGS = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}


def _record_lines(node: yaml.Node, loc: Loc, doc: YamlDocument) -> None:
    doc.lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            child: Loc = (*loc, key)
            doc.lines[child] = key_node.start_mark.line + 1
            _record_lines(value_node, child, doc)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, (*loc, index), doc)
    elif isinstance(node, yaml.ScalarNode) and node.tag in _NUMBER_TAGS:
        doc.numbers_as_text[loc] = node.value


def load_yaml_mapping(path: Path) -> YamlDocument:
    """Load ``path`` as a YAML mapping with line numbers.

    Raises:
        ProblemsError: the file is unreadable, not UTF-8, not valid YAML, uses a non-standard tag,
            has a duplicate key, is empty, or its top level is not a mapping.
    """
    shown = display_path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProblemsError([Problem(shown, 1, "-", f"cannot read file: {exc.strerror}")]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        message = f"file is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        raise ProblemsError([Problem(shown, line, "-", message)]) from exc
    loader = _StrictSafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        message = " ".join(str(exc.problem or exc).split())
        where = "-"
        if "could not determine a constructor" in message:
            message = f"tag not allowed (only plain YAML is accepted): {message}"
            where = _key_on_line(text, line)
        raise ProblemsError([Problem(shown, line, where, f"invalid YAML: {message}")]) from exc
    except yaml.YAMLError as exc:
        raise ProblemsError([Problem(shown, 1, "-", f"invalid YAML: {exc}")]) from exc
    finally:
        loader.dispose()
    if data is None or node is None:
        raise ProblemsError([Problem(shown, 1, "-", "file is empty: expected a YAML mapping")])
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise ProblemsError([Problem(shown, node.start_mark.line + 1, "-", f"top level must be a mapping, got {kind}")])
    doc = YamlDocument(path=path, data=data)
    _record_lines(node, (), doc)
    return doc
