"""Units every stage shares: the one ε type (value + display form) and accuracy in percent."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

Percent = Annotated[float, Field(ge=0, le=100, description="accuracy in percent, 0-100")]

_FRACTION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")


def parse_epsilon(raw: Any) -> tuple[float, str]:
    """Parse an ε written ``4/255``, ``"0.5"`` or ``0.0157`` into ``(value, display)``.

    Raises:
        ValueError: the value is not a fraction or a non-negative number.
    """
    if isinstance(raw, bool):
        raise ValueError(f"cannot parse epsilon {raw!r}: write it as '4/255' or a number")
    if isinstance(raw, int | float):
        value = float(raw)
        display = _display_for(value)
    elif isinstance(raw, str):
        match = _FRACTION.match(raw)
        if match:
            num, den = float(match.group(1)), float(match.group(2))
            if den == 0:
                raise ValueError(f"cannot parse epsilon {raw!r}: division by zero")
            value, display = num / den, f"{match.group(1)}/{match.group(2)}"
        else:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"cannot parse epsilon {raw!r}: write it as '4/255' or a number") from None
            display = _display_for(value)
    else:
        raise ValueError(f"cannot parse epsilon {raw!r}: write it as '4/255' or a number")
    if value < 0 or value != value:
        raise ValueError(f"epsilon must be a non-negative number, got {raw!r}")
    return value, display


def _display_for(value: float) -> str:
    """``4/255`` when ``value`` is a whole multiple of 1/255, else the number itself."""
    frac = Fraction(value).limit_denominator(255)
    if frac.denominator == 255 and abs(float(frac) - value) < 1e-9:
        return f"{frac.numerator}/255"
    if value and abs(value * 255 - round(value * 255)) < 1e-6:
        return f"{round(value * 255)}/255"
    return f"{value:g}"


class Epsilon(BaseModel):
    """A perturbation budget stored structured: its value and how it is displayed.

    In YAML write ``eps: 4/255`` or ``eps: 0.0157``; the norm is the sibling field ``norm``.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)

    value: float = Field(ge=0, description="the budget as a float (on [0, 1] pixels for linf)")
    display: str = Field(description="human form, e.g. '4/255'")

    @classmethod
    def parse(cls, raw: Any) -> Epsilon:
        """An ε from ``'4/255'``, ``'0.5'`` or ``0.0157`` (see :func:`parse_epsilon`)."""
        value, display = parse_epsilon(raw)
        return cls(value=value, display=display)


def _to_epsilon(raw: Any) -> Any:
    if isinstance(raw, dict | Epsilon):
        return raw
    value, display = parse_epsilon(raw)
    return {"value": value, "display": display}


EpsilonField = Annotated[
    Epsilon,
    BeforeValidator(_to_epsilon, json_schema_input_type=str | float | Epsilon),
    Field(description="'4/255', a float, or {value, display}"),
]
