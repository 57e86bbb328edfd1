"""One reportable problem in an input file: ``path:line: field: message``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, order=True)
class Problem:
    """A problem located in a file, printed as ``path:line: field: message``.

    Attributes:
        path: The file the problem is in.
        line: 1-based line number (1 when the whole file is concerned).
        field: Dotted path of the field (``cost.inference``, ``reported[2].eps``), or ``-``.
        message: What is wrong, in one line.
    """

    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


class ProblemsError(Exception):
    """Raised when an input file (or several) holds problems; carries all of them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def display_path(path: Path) -> str:
    """Return ``path`` relative to the working directory where possible, else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
