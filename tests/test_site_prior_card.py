"""The small diffusion prior's card on the site: taken from the result records (fields, loss curve) and their
executed notebooks (sample grid), so that a clean clone without a cache shows it; the local cache fills only
what the records lack, and only for the same weights; the site never trains a prior."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import nbformat
import pytest

from conftest import REPO
from test_site import make_root
from vlmdefense.site import build as site
from vlmdefense.site.cli import build_site
from vlmdefense.site.models import GRID_TAG, notebook_grid
from vlmdefense.workbench import diffusion_prior

KEY = "0123456789abcdef"
SHA = "ab" * 32
SUMMARY = {
    "model": "vlmd-small-ddpm",
    "recipe_key": KEY,
    "sha256": SHA,
    "parameters": 267891,
    "train_seconds": 65.9,
    "final_loss": 0.028,
    "metrics": {"test_denoising_mse": 0.02949},
}
CARD = {
    **SUMMARY,
    "recipe": {"steps": 800, "batch_size": 128, "seed": 7, "data": "digits <b>train</b>"},
    "seed": 7,
    "train_images": 1437,
    "train_cpu_seconds": 130.6,
    "threads": 2,
    "loss_curve": {"every_steps": 8, "mean_loss": [0.9, 0.3, 0.1, 0.05]},
    "sample_grid": {"file": "samples.png", "images": 64, "sampler": "ancestral DDPM, 100 strided steps"},
}


def png(colour: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (9, 9), (colour, colour, colour)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def no_cache_no_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache (a clean clone), and any attempt to train or load the prior fails the test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("VLMDEFENSE_CACHE", str(cache))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the site must not train or load the prior")

    for name in ("train_prior", "write_prior", "ensure_prior", "load_diffusion_prior"):
        monkeypatch.setattr(diffusion_prior, name, refuse)
    return cache


def with_prior(root: Path, finding: str, card: dict, grid: bytes | None) -> Path:
    """The small data root's ``example`` smoke record holding ``card`` under ``findings.<finding>``, and its
    executed notebook showing ``grid`` in a cell tagged for the site."""
    folder = root / "reproductions" / "example" / "smoke"
    record = json.loads((folder / "result.json").read_text("utf-8"))
    record["findings"] = {finding: card}
    (folder / "result.json").write_text(json.dumps(record), "utf-8")
    if grid is not None:
        notebook = nbformat.read(str(folder / "example.ipynb"), as_version=4)
        cell = nbformat.v4.new_code_cell("display(Image(grid))", execution_count=2, metadata={"tags": [GRID_TAG]})
        data = {"image/png": base64.b64encode(grid).decode(), "text/plain": "<Image>"}
        cell.outputs = [nbformat.v4.new_output("display_data", data=data)]
        notebook.cells.append(cell)
        nbformat.write(notebook, folder / "example.ipynb")
    return root


def test_the_card_comes_from_the_record_and_its_notebook(tmp_path: Path) -> None:
    grid = png(200)
    root = with_prior(make_root(tmp_path / "root"), "prior_card", CARD, grid)
    generated = site.generate(root, tmp_path / "docs")
    docs = tmp_path / "docs"
    page = (docs / "models.md").read_text("utf-8")
    for shown in (f"`{KEY}`", f"`{SHA}`", "0.02949", "267,891", "1437", "130.6 s on 2 thread(s)", "| Seed | 7 |"):
        assert shown in page
    assert "digits &lt;b&gt;train&lt;/b&gt;" in page and "<b>train" not in page  # recipe text is escaped
    assert f"{{: #prior-{KEY} }}" in page and "(methods/example.md) (smoke)" in page
    assert (docs / f"assets/models/{KEY}-samples.png").read_bytes() == grid
    assert f"assets/models/{KEY}-loss.png" in generated.files and f"({f'assets/models/{KEY}-loss.png'})" in page
    assert "sample grid from the executed notebook of example (smoke)" in page
    assert "from the local cache of the prior" not in page
    method = (docs / "methods" / "example.md").read_text("utf-8")
    assert f"(../models.md#prior-{KEY})" in method and f"`{KEY}`" in method
    assert "prior" not in (docs / "methods" / "quiet.md").read_text("utf-8").lower()
    assert {"Models": "models.md"} in generated.nav


def test_a_summary_only_record_says_what_is_missing(tmp_path: Path) -> None:
    root = with_prior(make_root(tmp_path / "root"), "prior", SUMMARY, None)
    site.generate(root, tmp_path / "docs")
    page = (tmp_path / "docs" / "models.md").read_text("utf-8")
    assert f"`{SHA}`" in page and "0.02949" in page
    assert "No loss curve" in page and "No sample grid" in page
    assert not (tmp_path / "docs" / "assets" / "models").exists()


def test_the_cache_fills_only_what_the_record_lacks_for_the_same_weights(
    tmp_path: Path, no_cache_no_training: Path
) -> None:
    folder = no_cache_no_training / "models" / f"vlmd-small-ddpm-{KEY}"
    folder.mkdir(parents=True)
    (folder / "samples.png").write_bytes(png(90))
    root = with_prior(make_root(tmp_path / "root"), "prior", SUMMARY, None)
    (folder / "card.json").write_text(json.dumps({**CARD, "sha256": "cd" * 32}), "utf-8")  # other weights
    site.generate(root, tmp_path / "other")
    assert "No sample grid" in (tmp_path / "other" / "models.md").read_text("utf-8")
    (folder / "card.json").write_text(json.dumps({**CARD, "final_loss": 0.5}), "utf-8")  # the same weights
    site.generate(root, tmp_path / "docs")
    page = (tmp_path / "docs" / "models.md").read_text("utf-8")
    assert (tmp_path / "docs" / f"assets/models/{KEY}-samples.png").read_bytes() == png(90)
    assert "local cache of the prior (same sha256): recipe, seed" in page and "loss curve, sample grid" in page
    assert "| Final training loss | 0.028 |" in page  # the record's value wins over the cache's


def test_notebook_grid_ignores_untagged_images(tmp_path: Path) -> None:
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("plot()", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(png(1)).decode()})]
    notebook.cells = [cell]
    nbformat.write(notebook, tmp_path / "n.ipynb")
    assert notebook_grid(tmp_path / "n.ipynb") is None
    assert notebook_grid(tmp_path / "missing.ipynb") is None


def test_the_committed_diffpure_record_puts_its_prior_on_the_site(tmp_path: Path) -> None:
    record = json.loads((REPO / "reproductions" / "diffpure" / "smoke" / "result.json").read_text("utf-8"))
    key = record["findings"]["prior"]["recipe_key"]
    site.generate(REPO, tmp_path / "docs")
    page = (tmp_path / "docs" / "models.md").read_text("utf-8")
    assert f"{{: #prior-{key} }}" in page and record["findings"]["prior"]["sha256"] in page
    assert "(methods/diffpure.md) (smoke)" in page
    assert f"(../models.md#prior-{key})" in (tmp_path / "docs" / "methods" / "diffpure.md").read_text("utf-8")


def test_strict_build_resolves_the_card_links_and_images(tmp_path: Path) -> None:
    root = with_prior(make_root(tmp_path / "root"), "prior_card", CARD, png(200))
    out = tmp_path / "site"
    build_site(REPO / "mkdocs.yml", out, data_root=root)
    html = (out / "models" / "index.html").read_text("utf-8")
    assert f'id="prior-{KEY}"' in html and f"{KEY}-samples.png" in html and f"{KEY}-loss.png" in html
