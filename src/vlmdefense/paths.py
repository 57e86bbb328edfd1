"""Where the repository is: the one rule every command and the harness use to find it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

ROOT_ENV = "VLMDEFENSE_ROOT"
RUN_MARKERS = ("reproductions/profiles.yaml",)


def find_root(start: Path | None = None, markers: Sequence[str] = RUN_MARKERS) -> Path:
    """The repository root: ``$VLMDEFENSE_ROOT``, or the nearest folder above ``start`` (default: the
    working directory) that holds every path of ``markers``.

    Raises:
        FileNotFoundError: no such folder.
    """
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / marker).exists() for marker in markers):
            return folder
    raise FileNotFoundError(f"no {' and '.join(markers)} above {here}: run from the repository (or set {ROOT_ENV})")
