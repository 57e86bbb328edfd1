"""What every JSON record of a run shares: the frozen base model and the reading of a file into it with
``path:line: field: message`` problems (result records, checkpoint records)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from vlmdefense.problems import Problem, display_path


class Record(BaseModel):
    """Base of result models: unknown keys are kept out (errors), values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


RecordT = TypeVar("RecordT", bound=BaseModel)


def json_line(text: str, key: str | int | None) -> int:
    """Best-effort line of a key in pretty-printed JSON (1 when unknown)."""
    if isinstance(key, str):
        needle = f'"{key}":'
        for number, line in enumerate(text.splitlines(), start=1):
            if needle in line:
                return number
    return 1


def parse_record_file(path: Path, model: type[RecordT]) -> tuple[RecordT | None, str, list[Problem]]:
    """``(record, text, problems)`` of a JSON record file validated as ``model``: the record is None when the
    file cannot be read, is not JSON or does not validate, and each problem then names the line and field."""
    shown = display_path(Path(path))
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        return None, "", [Problem(shown, 1, "-", f"cannot read result: {exc}")]
    except json.JSONDecodeError as exc:
        return None, text, [Problem(shown, exc.lineno, "-", f"invalid JSON: {exc.msg}")]
    try:
        return model.model_validate(data), text, []
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            field = ".".join(str(p) for p in loc) or "-"
            key = next((p for p in reversed(loc) if isinstance(p, str)), None)
            problems.append(
                Problem(shown, json_line(text, key), field, str(error["msg"]).removeprefix("Value error, "))
            )
        return None, text, problems
