"""pytest plugin of the mutation run (``make mutation``): every mutant's test run shares one model cache.

The suite's ``conftest.py`` gives each pytest session a fresh temporary cache, so each mutant would train
the small CLIP again (about 40 s); the mutation tool starts hundreds of sessions. Loaded with
``-p mutation_plugin``, this points the library at one persistent folder after ``conftest`` has run
(``$VLMDEFENSE_MUTATION_CACHE``, default ``.cache/mutation`` beside the tests' folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CACHE_ENV = "VLMDEFENSE_CACHE"


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """Replace the session's temporary model cache by the mutation run's persistent one."""
    default = Path(__file__).resolve().parents[1] / ".cache" / "mutation"
    os.environ[CACHE_ENV] = os.environ.get("VLMDEFENSE_MUTATION_CACHE", str(default))
