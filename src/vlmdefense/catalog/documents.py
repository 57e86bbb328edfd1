"""Validation of one loaded YAML document against a pydantic model: every error located at its line,
with a message that names what was expected (shared by catalog entries, the taxonomy and the survey)."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from vlmdefense.catalog.yaml_source import Loc, YamlDocument
from vlmdefense.problems import Problem

PLACEHOLDER = "TODO"


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (through Optional, list, Annotated), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_class(typing.get_args(annotation)[0])
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_class(arg)
            if found is not None:
                return found
    return None


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Names of the fields allowed at ``loc`` inside ``model`` (for did-you-mean hints)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part)
        current = _model_class(info.annotation) if info is not None else None
    return list(current.model_fields) if current is not None else []


def _message(error: ErrorDetails, model: type[BaseModel]) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
        return f"unknown field{hint}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if "input" in error and kind not in {"model_type", "dict_type"}:
        shown = repr(error["input"])
        if len(shown) <= 60:
            message += f" (got {shown})"
    return message


def problems_from_validation(exc: ValidationError, doc: YamlDocument, model: type[BaseModel]) -> list[Problem]:
    """Turn a pydantic error into one located problem per failing field."""
    problems = []
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        problems.append(doc.problem(loc, _message(error, model)))
    return problems


def _placeholders(data: Any, loc: Loc = ()) -> list[Loc]:
    if isinstance(data, str):
        return [loc] if PLACEHOLDER in data else []
    if isinstance(data, dict):
        return [hit for key, value in data.items() for hit in _placeholders(value, (*loc, key))]
    if isinstance(data, list):
        return [hit for i, value in enumerate(data) for hit in _placeholders(value, (*loc, i))]
    return []


def validate_document(doc: YamlDocument, model: type[BaseModel]) -> tuple[Any, list[Problem]]:
    """Validate a loaded document against ``model``; also rejects TODO placeholders."""
    problems = [doc.problem(loc, f"placeholder {PLACEHOLDER!r} must be replaced") for loc in _placeholders(doc.data)]
    try:
        value = model.model_validate(doc.data)
    except ValidationError as exc:
        as_text = [
            tuple(e["loc"])
            for e in exc.errors()
            if e["type"] == "string_type" and tuple(e["loc"]) in doc.numbers_as_text
        ]
        if not as_text:
            return None, problems + problems_from_validation(exc, doc, model)
        try:
            value = model.model_validate(doc.with_text_at(as_text))
        except ValidationError as again:
            return None, problems + problems_from_validation(again, doc, model)
    return (value if not problems else None), problems
