"""A CLIP of a given architecture with random weights: the start of training from scratch.

open_clip warns on the root logger whenever a model is created without pretrained weights; here that is
the intent, so the warning is kept out of the log (and out of executed notebooks).
"""

from __future__ import annotations

import logging

import open_clip

from vlmdefense.workbench.models import SMALL_CLIP, register_small_clip, set_seed

_NO_WEIGHTS = "No pretrained weights loaded"


class _ExpectedRandomInit(logging.Filter):
    """Drops open_clip's notice that a model was initialised randomly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _NO_WEIGHTS not in record.getMessage()


def fresh_clip(name: str, seed: int, device: str = "cpu") -> open_clip.CLIP:
    """A randomly initialised CLIP of architecture ``name`` (no pretrained weights), seeded, in train mode."""
    if name == SMALL_CLIP:
        register_small_clip()
    set_seed(seed)
    root = logging.getLogger()
    quiet = _ExpectedRandomInit()
    root.addFilter(quiet)
    try:
        model = open_clip.create_model(name, pretrained=None, device=device)
    finally:
        root.removeFilter(quiet)
    model.train()
    return model
