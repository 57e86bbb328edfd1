"""The schema reference page: every field of a catalog entry, read from the pydantic models."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from vlmdefense.catalog.schema import Entry
from vlmdefense.site.render import Writer, render
from vlmdefense.units import Epsilon

SCALARS = {"str": "text", "int": "integer", "float": "number", "bool": "true / false"}


@dataclass
class TypeName:
    """A field's type as the page names it: ``kind`` is list, enum, eps, mapping, scalar or other."""

    kind: str
    optional: bool = False
    name: str = ""
    values: list[str] = field(default_factory=list)
    item: TypeName | None = None


@dataclass
class FieldRow:
    """One field: dotted path, type, required, default (JSON text; ``None``: a nested model), description."""

    path: str
    type: TypeName
    required: bool
    default: str | None
    description: str


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Strip ``Annotated`` and ``None`` from a union; returns the inner type and whether it was optional."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation, optional


def type_name(annotation: Any) -> TypeName:
    """How the page names the type of a field."""
    inner, optional = _unwrap(annotation)
    if typing.get_origin(inner) is list:
        return TypeName("list", optional, item=type_name(typing.get_args(inner)[0]))
    if isinstance(inner, type) and issubclass(inner, Enum):
        return TypeName("enum", optional, values=[str(m.value) for m in inner])
    if inner is Epsilon:
        return TypeName("eps", optional)
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return TypeName("mapping", optional)
    if isinstance(inner, type):
        return TypeName("scalar", optional, name=SCALARS.get(inner.__name__, inner.__name__))
    return TypeName("other", optional, name=str(inner))


def _description(info: FieldInfo) -> str:
    if info.description:
        return info.description
    stack = [info.annotation]
    while stack:
        current = stack.pop()
        if typing.get_origin(current) is typing.Annotated:
            for meta in typing.get_args(current)[1:]:
                if isinstance(meta, FieldInfo) and meta.description:
                    return meta.description
            stack.append(typing.get_args(current)[0])
        else:
            stack.extend(typing.get_args(current))
    return ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    inner, _ = _unwrap(annotation)
    if typing.get_origin(inner) is list:
        inner, _ = _unwrap(typing.get_args(inner)[0])
    if isinstance(inner, type) and issubclass(inner, BaseModel) and inner is not Epsilon:
        return inner
    return None


def _model_doc(annotation: Any) -> str:
    nested = _model_of(annotation)
    return (nested.__doc__ or "").strip().splitlines()[0] if nested is not None and nested.__doc__ else ""


def _default(info: FieldInfo) -> str | None:
    """The default as JSON text, ``None`` for a nested model's (its fields follow)."""
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        return None if isinstance(value, BaseModel) else json.dumps(value)
    value = info.default
    if isinstance(value, Enum):
        value = value.value
    return json.dumps(value)


def schema_rows(model: type[BaseModel] = Entry, prefix: str = "") -> list[FieldRow]:
    """One row per field of ``model`` and of its nested models."""
    rows = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        inner, _ = _unwrap(info.annotation)
        required = info.is_required()
        default = None if required else _default(info)
        description = _description(info) or _model_doc(info.annotation)
        rows.append(FieldRow(path, type_name(info.annotation), required, default, description))
        nested = _model_of(info.annotation)
        if nested is not None:
            rows += schema_rows(nested, f"{path}[]." if typing.get_origin(inner) is list else f"{path}.")
    return rows


def schema_page(w: Writer) -> None:
    """Write ``schema.md``."""
    w.page("schema.md", "Schema reference", render("schema.md.j2", rows=schema_rows()))
