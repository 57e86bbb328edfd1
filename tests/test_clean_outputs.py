"""Committed reproductions are fit to read: no path of the machine that ran them, no progress-bar noise."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

# absolute paths of a machine: a home folder, a temporary folder, an installed package, the checkout itself
MACHINE_PATHS = re.compile(r"(/home/[\w.-]+|/Users/[\w.-]+|/root/|/tmp/|site-packages|dist-packages|[A-Z]:\\\\Users)")
PROGRESS_NOISE = ("it/s]", "s/it]", "TqdmWarning", "IProgress not found", "\r")


def committed_outputs() -> list[Path]:
    """Every file under ``reproductions/`` that git tracks (what a reader of the repository sees)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "reproductions"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [REPO / name for name in listed.split("\0") if name]


def stream_texts(notebook: Path, names: tuple[str, ...] = ("stdout", "stderr")) -> list[str]:
    """The text of every stream output (of the streams ``names``) of an executed notebook."""
    cells = json.loads(notebook.read_text(encoding="utf-8")).get("cells", [])
    texts = []
    for cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") in names:
                text = output.get("text", "")
                texts.append("".join(text) if isinstance(text, list) else text)
    return texts


OUTPUTS = committed_outputs()


def test_there_are_committed_outputs_to_check() -> None:
    assert any(p.suffix == ".ipynb" for p in OUTPUTS) and any(p.name == "result.json" for p in OUTPUTS)


@pytest.mark.parametrize("path", OUTPUTS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_machine_path_in_a_committed_output(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace")
    found = {m.group(0) for m in MACHINE_PATHS.finditer(text)}
    found |= {str(REPO)} if str(REPO) in text else set()
    found |= {str(Path.home())} if len(str(Path.home())) > 1 and f"{Path.home()}/" in text else set()
    assert not found, f"{path.relative_to(REPO)} names machine paths: {sorted(found)}"


@pytest.mark.parametrize("path", [p for p in OUTPUTS if p.suffix == ".ipynb"], ids=lambda p: str(p.relative_to(REPO)))
def test_no_progress_bar_noise_in_an_executed_notebook(path: Path) -> None:
    noisy = [t[:120] for t in stream_texts(path) if any(mark in t for mark in PROGRESS_NOISE)]
    assert not noisy, f"{path.relative_to(REPO)} has progress-bar output: {noisy[:3]}"


@pytest.mark.parametrize("path", [p for p in OUTPUTS if p.suffix == ".ipynb"], ids=lambda p: str(p.relative_to(REPO)))
def test_no_stderr_in_an_executed_notebook(path: Path) -> None:
    """Warnings and log lines on stderr render as red blocks on the site; what matters to a reader is printed."""
    errors = [t[:120] for t in stream_texts(path, ("stderr",))]
    assert not errors, f"{path.relative_to(REPO)} has stderr output: {errors[:3]}"


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    notebook = tmp_path / "n.ipynb"
    noise = "100%|##########| 10/10 [00:01<00:00,  9.5it/s]\n"
    warning = "/home/someone/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found"
    cells = [{"cell_type": "code", "outputs": [{"output_type": "stream", "name": "stderr", "text": [noise]}]}]
    notebook.write_text(json.dumps({"cells": cells}))
    assert any("it/s]" in t for t in stream_texts(notebook))
    assert stream_texts(notebook, ("stderr",)) == [noise] and stream_texts(notebook, ("stdout",)) == []
    assert {m.group(0) for m in MACHINE_PATHS.finditer(warning)} == {"/home/someone", "site-packages"}
