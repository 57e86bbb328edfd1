"""Progress bars where someone watches them: a terminal or a live notebook (one widget there, through
``tqdm.auto`` and ipywidgets), and none in a batch run, whose executed notebook is a page to read.

The runner turns bars off for the notebooks it executes (``VLMDEFENSE_PROGRESS=0``); its own command line
reports each notebook as it finishes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

PROGRESS_ENV = "VLMDEFENSE_PROGRESS"
_OFF = {"0", "off", "false", "no"}

T = TypeVar("T")


def progress_enabled() -> bool:
    """False when ``$VLMDEFENSE_PROGRESS`` is ``0``/``off``/``false``/``no``."""
    return os.environ.get(PROGRESS_ENV, "1").strip().lower() not in _OFF


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    leave: bool = False,
    disable: bool = False,
) -> Any:
    """A ``tqdm.auto`` bar over ``iterable`` (or a manual one of ``total`` steps), silent when
    :func:`progress_enabled` is false or ``disable`` is set."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=disable or not progress_enabled())
