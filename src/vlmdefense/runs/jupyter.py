"""The project's Jupyter kernel and the scratch copies ``vlmdefense open`` works on.

``make setup`` installs a kernel spec named ``vlmdefense`` inside ``.venv`` (``python -m ipykernel install
--sys-prefix``), so nothing lands in the user's home. The runner executes notebooks on it when it points at
the running interpreter, and names it in every executed notebook, so Jupyter opens them without asking for
a kernel. A scratch copy is ``scratch/<id>-<profile>[-<variant>].ipynb`` (git-ignored): the method's notebook
with the profile and overrides written into its ``parameters`` cell, never a file under ``notebooks/``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from vlmdefense.fileio import atomic_write_text
from vlmdefense.runs.variants import variant_slug

logger = logging.getLogger(__name__)

PROJECT_KERNEL = "vlmdefense"
DISPLAY_NAME = "VLM Defense Atlas (.venv)"
SCRATCH = "scratch"
PARAMETERS_TAG = "parameters"


def _same_interpreter(executable: str) -> bool:
    """Whether a kernel's ``argv[0]`` is this environment's Python (same prefix: a venv's python is a link
    to the base interpreter, so resolving links would not tell two venvs apart)."""
    path = Path(os.path.abspath(executable))
    prefix = Path(os.path.abspath(sys.prefix))
    return path == Path(os.path.abspath(sys.executable)) or (path.parent.parent == prefix and path.exists())


def project_kernel_spec() -> Any | None:
    """The installed ``vlmdefense`` kernel spec (a ``jupyter_client`` ``KernelSpec``), or ``None``."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        return None
    try:
        return KernelSpecManager().get_kernel_spec(PROJECT_KERNEL)
    except NoSuchKernel:
        return None


def runner_kernel() -> str | None:
    """``vlmdefense`` when that kernel is installed and runs this interpreter, else ``None`` (papermill then
    uses the kernel the notebook's metadata names)."""
    spec = project_kernel_spec()
    if spec is None:
        return None
    if not spec.argv or not _same_interpreter(spec.argv[0]):
        logger.warning(
            "the %r kernel at %s runs %s, not this environment's Python: using the notebook's own kernel",
            PROJECT_KERNEL,
            spec.resource_dir,
            spec.argv[0] if spec.argv else "nothing",
        )
        return None
    return PROJECT_KERNEL


def kernel_metadata(name: str) -> dict[str, str]:
    """The ``kernelspec`` metadata of a notebook that runs on kernel ``name``."""
    if name == PROJECT_KERNEL:
        return {"name": PROJECT_KERNEL, "display_name": DISPLAY_NAME, "language": "python"}
    display = name
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        spec = KernelSpecManager().get_kernel_spec(name)
        display, language = spec.display_name, spec.language
    except Exception:  # an unknown kernel keeps its name as its display name
        language = "python"
    return {"name": name, "display_name": display, "language": language}


@dataclass(frozen=True)
class ScratchCopy:
    """A scratch copy of a method's notebook: where it is and whether this call wrote it."""

    path: Path
    created: bool
    kernel: str | None


def scratch_path(root: Path, method: str, profile: str, overrides: dict[str, Any] | None = None) -> Path:
    """``scratch/<method>-<profile>[-<variant slug>].ipynb`` under the repository."""
    suffix = f"-{variant_slug(overrides)}" if overrides else ""
    return Path(root) / SCRATCH / f"{method}-{profile}{suffix}.ipynb"


def parameters_source(profile: str, overrides: dict[str, Any]) -> str:
    """The ``parameters`` cell of a scratch copy (Python literals, comments say where they came from)."""
    return (
        f"profile = {json.dumps(profile)}   # written by `vlmdefense open` (reproductions/profiles.yaml)\n"
        f"overrides = {overrides!r}   # any profile key on top\n"
        'result_path = ""    # a scratch copy records nothing; `vlmdefense run ID -p KEY=VALUE` records a variant'
    )


def write_scratch_copy(
    root: Path,
    method: str,
    profile: str,
    overrides: dict[str, Any] | None = None,
    fresh: bool = False,
) -> ScratchCopy:
    """Copy ``notebooks/<method>.ipynb`` to its scratch path with the profile and overrides in its
    ``parameters`` cell and the project's kernel in its metadata. An existing copy is kept (the user's
    edits with it) unless ``fresh``.

    Raises:
        FileNotFoundError: the method has no notebook.
        ValueError: the notebook has no cell tagged ``parameters``.
    """
    root = Path(root)
    target = scratch_path(root, method, profile, overrides)
    if target.is_file() and not fresh:
        return ScratchCopy(target, False, None)
    source = root / "notebooks" / f"{method}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"notebook notebooks/{method}.ipynb not found")
    notebook = nbformat.read(str(source), as_version=4)
    cells = [c for c in notebook.cells if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"notebooks/{method}.ipynb has no cell tagged {PARAMETERS_TAG!r}")
    cells[0].source = parameters_source(profile, dict(overrides or {}))
    kernel = runner_kernel()
    if kernel is not None:
        notebook.metadata["kernelspec"] = kernel_metadata(kernel)
    notebook.metadata["vlmdefense"] = {
        "source": f"notebooks/{method}.ipynb",
        "profile": profile,
        "overrides": dict(overrides or {}),
    }
    atomic_write_text(target, nbformat.writes(notebook))
    return ScratchCopy(target, True, kernel)
