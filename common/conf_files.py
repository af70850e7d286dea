"""Commented YAML of a config schema's defaults, so that ``conf/*.yaml`` is generated, never kept by
hand.

A schema dataclass is the one home of each default and of its explanation: the field's attribute
docstring (the string literal right after the field). :func:`render_defaults` writes both as YAML,
every key in the schema's order, each docstring as a ``#`` comment above its key (for a nested
config without one, its class docstring), required keys (omegaconf ``MISSING``) as ``???``.
Loading the result gives exactly the schema's defaults, so a file in ``conf/`` is checked against
its schema by comparing text (``sirenfeed conf --check``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import re
import textwrap
import typing
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf

WIDTH = 100
"""Columns the comments are wrapped to, and past which a list or dict is written in block style."""
INDENT = "  "
MIN_COMMENT_WIDTH = 40

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def render_defaults(schema: type, header: str) -> str:
    """``schema``'s defaults as commented YAML under ``header`` (a few lines: which command reads
    the file and how to override it), each line of which becomes a ``#`` comment."""
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    lines += ["", *_dataclass_lines(schema, _defaults(schema), 0, documented=True)]
    return "\n".join(lines) + "\n"


def attribute_docstrings(schema: type) -> dict[str, str]:
    """Field name -> the string literal that follows the field in ``schema``'s class body."""
    class_node = _class_node(schema)
    docstrings = {}
    for statement, following in zip(class_node.body, class_node.body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docstrings[statement.target.id] = inspect.cleandoc(following.value.value)
    return docstrings


def class_docstring(schema: type) -> str:
    """The docstring written in ``schema``'s source ("" where there is none: a dataclass without
    one gets a generated signature as ``__doc__``)."""
    return ast.get_docstring(_class_node(schema)) or ""


@functools.cache
def _class_node(schema: type) -> ast.ClassDef:
    (class_node,) = ast.parse(textwrap.dedent(inspect.getsource(schema))).body
    assert isinstance(class_node, ast.ClassDef)
    return class_node


def _defaults(schema: type) -> dict[str, Any]:
    """Plain values of ``schema``'s defaults, as omegaconf types them (a float field holds floats)."""
    return OmegaConf.to_container(OmegaConf.structured(schema))


def _dataclass_lines(schema: type, values: dict[str, Any], depth: int, documented: bool) -> list[str]:
    docstrings = attribute_docstrings(schema)
    types = typing.get_type_hints(schema)
    lines: list[str] = []
    previous_is_section = False
    for field in dataclasses.fields(schema):
        is_section = depth == 0 and _is_section(types[field.name])
        if lines and (is_section or previous_is_section):
            lines.append("")
        previous_is_section = is_section
        if documented:
            lines += _comment_lines(_docstring(field.name, types[field.name], docstrings), depth)
        lines += _entry_lines(field.name, types[field.name], values[field.name], depth, documented)
    return lines


def _entry_lines(name: str, field_type: Any, value: Any, depth: int, documented: bool) -> list[str]:
    indent = INDENT * depth
    if dataclasses.is_dataclass(field_type):
        # A required nested config (``features: FeaturesConfig = MISSING``) is written out with its
        # own defaults, which is what an override of one of its keys fills it with.
        nested = _defaults(field_type) if value == MISSING else value
        return [f"{indent}{name}:", *_dataclass_lines(field_type, nested, depth + 1, documented)]
    item_type = _dataclass_values(field_type)
    if item_type is not None and value:
        # The value class's docstrings are written once, on the first entry.
        lines = [f"{indent}{name}:"]
        for position, (key, item) in enumerate(value.items()):
            lines.append(f"{indent}{INDENT}{key}:")
            lines += _dataclass_lines(item_type, item, depth + 2, documented and position == 0)
        return lines
    return _leaf_lines(name, value, indent)


def _leaf_lines(name: str, value: Any, indent: str) -> list[str]:
    """``name: value``, a list or dict on one line in flow style where it fits, else in block style."""
    if isinstance(value, (list, dict)):
        flow = _dump(value, flow=True).strip()
        if len(indent) + len(name) + 2 + len(flow) <= WIDTH:
            return [f"{indent}{name}: {flow}"]
    return [f"{indent}{line}" for line in _dump({name: value}, flow=False).splitlines()]


def _dump(value: Any, flow: bool) -> str:
    return yaml.safe_dump(value, default_flow_style=flow, sort_keys=False, width=float("inf"),
                          allow_unicode=True)


def _comment_lines(docstring: str, depth: int) -> list[str]:
    """The docstring as ``#`` lines: prose refilled to :data:`WIDTH`, indented blocks (examples)
    kept as written, Sphinx markup (double backticks, roles such as ``:func:``) reduced to single
    backticks."""
    prefix = f"{INDENT * depth}# "
    width = max(MIN_COMMENT_WIDTH, WIDTH - len(prefix))
    text = _LITERAL.sub(r"`\1`", _ROLE.sub(r"`\1`", docstring))
    lines: list[str] = []
    for paragraph in text.split("\n\n"):
        if lines:
            lines.append(prefix.rstrip())
        for indented, rows in itertools.groupby(paragraph.splitlines(), key=_is_indented):
            if indented:
                lines += [(prefix + row).rstrip() for row in rows]
            else:
                prose = textwrap.wrap(" ".join(rows), width, break_long_words=False,
                                      break_on_hyphens=False)
                lines += [prefix + row for row in prose]
    return lines


def _is_indented(row: str) -> bool:
    return row.startswith(" ")


def _docstring(name: str, field_type: Any, docstrings: dict[str, str]) -> str:
    """The field's docstring; a nested config without one is introduced by its class docstring."""
    if name in docstrings:
        return docstrings[name]
    return class_docstring(field_type) if dataclasses.is_dataclass(field_type) else ""


def _dataclass_values(field_type: Any) -> type | None:
    """The value class of a ``dict[str, SomeDataclass]`` field, else ``None``."""
    if typing.get_origin(field_type) is dict:
        value_type = typing.get_args(field_type)[1]
        if dataclasses.is_dataclass(value_type):
            return value_type
    return None


def _is_section(field_type: Any) -> bool:
    """A key holding a nested config: at the top level it is set off by blank lines."""
    return dataclasses.is_dataclass(field_type) or _dataclass_values(field_type) is not None
