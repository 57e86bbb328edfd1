"""The atlas site: generated pages, escaping, strict builds, and the built site driven in headless Chromium.

The browser tests use the system's Chromium (``/usr/bin/chromium``, installed by ``make chromium``); they skip
when it is missing, except under CI (``$CI`` set), where they must run. Screenshots go to ``test-artifacts/site/``.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from typer.testing import CliRunner

from conftest import REPO, VALID_ENTRY
from vlmdefense.catalog.schema import Entry
from vlmdefense.catalog.validation import load_catalog
from vlmdefense.cli import app
from vlmdefense.site import build as site
from vlmdefense.site import labels, render
from vlmdefense.site.cli import SiteBuildError, build_site, make_server
from vlmdefense.site.method import assumptions_table

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts" / "site"
PAYLOAD = "<script>window.__pwned = 1</script>"
HOSTILE_TITLE = f"{PAYLOAD} Robust *CLIP* | [not a link](http://example.org) & <b>bold</b>"


# --------------------------------------------------------------------------------------------------
# A small data root: two entries (one with HTML in its title and name, one without any result), the
# baseline's and the first entry's smoke results, and an executed notebook.


def _robust_rows(shift: float, adaptive_drop: float | None) -> list[dict]:
    rows = []
    for k, base in ((1, 90.0), (2, 70.0), (4, 30.0), (8, 5.0)):
        value = min(100.0, base + shift)
        eps = {"value": k / 255, "display": f"{k}/255"}
        acc = {"all": value, "seen": min(100.0, value + 2), "unseen": max(0.0, value - 2), "transfer": value / 2}
        rows.append(
            {"attack": "PGD-10", "eps": eps, "steps": 10, "adaptive": False, "target": "defended-model", "acc": acc}
        )
        if adaptive_drop is not None:
            low = {key: max(0.0, v - adaptive_drop) for key, v in acc.items()}
            rows.append(
                {
                    "attack": "EOT-PGD-10",
                    "eps": eps,
                    "steps": 10,
                    "adaptive": True,
                    "target": "defended-pipeline",
                    "acc": low,
                }
            )
    return rows


def write_result(root: Path, method: str, shift: float, adaptive_drop: float | None = None) -> Path:
    """A valid smoke result record (and an executed notebook) for ``method`` under ``root/reproductions``."""
    robust = _robust_rows(shift, adaptive_drop)
    at8 = [r for r in robust if r["eps"]["display"] == "8/255"]
    record = {
        "method": method,
        "profile": "smoke",
        "status": "ok",
        "model": {"name": "vlmd-small-clip"},
        "dataset": {"test": "digits-test", "test_images": 360, "transfer": "mnist-5k", "transfer_images": 500},
        "clean": {"all": 97.0, "seen": 98.0, "unseen": 96.0, "transfer": 50.0},
        "robust": robust,
        "cost": {
            "train_seconds": 12.0,
            "inference_seconds_per_image": 0.001,
            "forward_passes": 1,
            "backward_passes": 0,
        },
        "headline": {
            "eps": {"value": 8 / 255, "display": "8/255"},
            "clean": 97.0,
            "robust": min(r["acc"]["all"] for r in at8 if not r["adaptive"]),
            "robust_adaptive": min((r["acc"]["all"] for r in at8 if r["adaptive"]), default=None),
        },
        "provenance": {
            "git_commit": "0123456789abcdef",
            "dirty": False,
            "versions": {"python": "3"},
            "device": "cpu",
            "seed": 0,
            "started": "2026-01-01T00:00:00+00:00",
            "duration_seconds": 3.0,
            "templates": None,
        },
    }
    folder = root / "reproductions" / method / "smoke"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "result.json"
    path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell(f"# {method} executed notebook\n\nRendered, never re-executed."),
        nbformat.v4.new_code_cell("print('smoke numbers')", execution_count=1),
    ]
    notebook.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="smoke numbers\n")]
    nbformat.write(notebook, folder / f"{method}.ipynb")
    return path


def make_root(root: Path) -> Path:
    """The data root described above."""
    catalog = root / "catalog"
    (catalog / "training-time").mkdir(parents=True)
    shutil.copy(REPO / "catalog" / "taxonomy.yaml", catalog / "taxonomy.yaml")
    hostile = VALID_ENTRY.format(id="example", related="[quiet]")
    hostile = hostile.replace("title: An Example Defense for Tests", f"title: {json.dumps(HOSTILE_TITLE)}")
    hostile = hostile.replace("name: Example", 'name: "Ex<i>ample</i> $x$"')
    (catalog / "training-time" / "example.yaml").write_text(hostile, encoding="utf-8")
    quiet = VALID_ENTRY.format(id="quiet", related="[example]").replace("name: Example", "name: Quiet")
    (catalog / "training-time" / "quiet.yaml").write_text(quiet, encoding="utf-8")
    (root / "reproductions").mkdir()
    shutil.copy(REPO / "reproductions" / "profiles.yaml", root / "reproductions" / "profiles.yaml")
    write_result(root, "baseline", shift=0.0)
    write_result(root, "example", shift=20.0, adaptive_drop=6.0)
    return root


@pytest.fixture(scope="module")
def small_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The strict build of the small data root."""
    root = make_root(tmp_path_factory.mktemp("root"))
    out = tmp_path_factory.mktemp("small-site")
    build_site(REPO / "mkdocs.yml", out, data_root=root)
    return out


@pytest.fixture(scope="session")
def real_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real catalog's site, built by ``vlmdefense site build`` (strict)."""
    out = tmp_path_factory.mktemp("real-site")
    old = Path.cwd()
    os.chdir(REPO)
    try:
        result = CliRunner().invoke(app, ["site", "build", "--out", str(out)])
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output
    assert "built the site in" in result.stdout
    return out


def real_entries() -> list[Entry]:
    catalog, problems = load_catalog(REPO / "catalog")
    assert catalog is not None and not problems
    return catalog.entries


# --------------------------------------------------------------------------------------------------
# Unit tests


def test_text_escapes_html_and_markdown() -> None:
    assert render.text("<b>x</b> & y") == "&lt;b&gt;x&lt;/b&gt; &amp; y"
    assert render.text("a|b *c* [d](e) `f`\n  g") == r"a\|b \*c\* \[d\](e) \`f\` g"
    assert "<" not in render.nav_title("<script>") and ">" not in render.nav_title("<script>")
    assert render.fence("x ``` y").startswith("````")


def test_an_assumption_the_sources_leave_open_shows_as_not_stated() -> None:
    import yaml

    data = yaml.safe_load(VALID_ENTRY.format(id="open-facts", related="[]"))
    data["links"]["arxiv"] = "2401.00001"  # plain YAML reads the id as a number; the catalog's loader keeps text
    data["assumptions"]["needs_labels"] = None
    entry = Entry.model_validate(data)
    assert "| Needs labelled data | not stated |" in assumptions_table(entry)
    assert "labels?" in labels.assumption_tags(entry)
    data["assumptions"]["needs_labels"] = True
    assert "labels" in labels.assumption_tags(Entry.model_validate(data))


def test_generated_pages_exist_for_every_entry(tmp_path: Path) -> None:
    generated = site.generate(REPO, tmp_path / "docs")
    files = set(generated.files)
    entries = real_entries()
    catalog, _ = load_catalog(REPO / "catalog")
    for entry in entries:
        page = f"methods/{entry.id}.md"
        assert page in files
        text = (tmp_path / "docs" / page).read_text(encoding="utf-8")
        assert render.text(entry.name) in text and render.text(entry.title) in text
        assert "```bibtex" in text
    for info in catalog.taxonomy.paradigms:
        assert f"taxonomy/{info.id.value}/index.md" in files
        for family in info.families:
            page = tmp_path / "docs" / "taxonomy" / info.id.value / f"{family.id}.md"
            listed = set(re.findall(r"\(\.\./\.\./methods/([a-z0-9-]+)\.md\)", page.read_text(encoding="utf-8")))
            assert listed == {e.id for e in entries if e.family == family.id}
    assert {"index.md", "taxonomy/index.md", "compare.md", "results.md", "schema.md"} <= files
    nav = json.dumps(generated.nav)
    assert all(f"methods/{e.id}.md" in nav for e in entries)
    compare = (tmp_path / "docs" / "compare.md").read_text(encoding="utf-8")
    assert all(f"(methods/{e.id}.md)" in compare for e in entries)
    schema = (tmp_path / "docs" / "schema.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in schema for name in Entry.model_fields)
    assert "`assumptions.randomized`" in schema and "`reported[].eps`" in schema


def test_results_pages_with_and_without_results(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    generated = site.generate(root, tmp_path / "docs")
    docs = tmp_path / "docs"
    example = (docs / "methods" / "example.md").read_text(encoding="utf-8")
    assert "Beside the paper's numbers" in example
    assert "30.2 → 94.0 (+63.8)" in example  # paper robust at 1/255 → ours, worst incl. adaptive (Δ)
    assert "(example/smoke.ipynb)" in example and "methods/example/smoke.ipynb" in generated.files
    assert "assets/plots/methods/example-smoke.svg" in generated.files
    quiet = (docs / "methods" / "quiet.md").read_text(encoding="utf-8")
    assert "**No result yet.**" in quiet
    results = (docs / "results.md").read_text(encoding="utf-8")
    for name in ("sweep-training-time", "gain-cost", "seen-unseen"):
        assert f"assets/plots/smoke-{name}.png" in generated.files
    assert "No smoke result for 1 training-time methods: [Quiet](methods/quiet.md)" in results
    assert "No test-time or training-free method has a smoke result yet." in results


def test_method_pages_show_the_commands_and_ignore_variants(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    canonical = root / "reproductions" / "example" / "smoke"
    variant = canonical / "variants" / "epochs=5-3f2a1c"
    variant.mkdir(parents=True)
    record = json.loads((canonical / "result.json").read_text(encoding="utf-8"))
    record["clean"]["all"] = record["headline"]["clean"] = 11.0
    (variant / "result.json").write_text(json.dumps(record), encoding="utf-8")
    shutil.copy(canonical / "example.ipynb", variant / "example.ipynb")
    (root / "catalog" / "training-time" / "example.yaml").write_text(
        (root / "catalog" / "training-time" / "example.yaml").read_text("utf-8")
        + "reproduction:\n  notebook: notebooks/example.ipynb\n  status: reproduced\n",
        "utf-8",
    )
    (root / "notebooks").mkdir()
    shutil.copy(canonical / "example.ipynb", root / "notebooks" / "example.ipynb")
    generated = site.generate(root, tmp_path / "docs")
    page = (tmp_path / "docs" / "methods" / "example.md").read_text(encoding="utf-8")
    box = page.split('!!! tip "Rerun it, open it, check a change"', 1)[1].split("\n\n", 2)[:2]
    commands = box[1]
    for line in ("vlmdefense run example", "vlmdefense open example", "vlmdefense check example"):
        assert f"    {line} " in commands
    assert "| **smoke** | 8/255 | 97.0 |" in page and "11.0" not in page, "the canonical numbers, not the variant's"
    assert not [f for f in generated.files if "variants" in f or "epochs" in f]
    quiet = (tmp_path / "docs" / "methods" / "quiet.md").read_text(encoding="utf-8")
    assert "vlmdefense run" not in quiet, "no commands for a method without a notebook"


def test_catalog_html_renders_as_text(small_site: Path) -> None:
    page = (small_site / "methods" / "example" / "index.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert "Ex&lt;i&gt;ample&lt;/i&gt;" in page
    for built in small_site.rglob("*.html"):
        content = built.read_text(encoding="utf-8")
        assert PAYLOAD not in content, built
        assert "Ex<i>ample" not in content, built
        assert "<b>bold</b>" not in content, built
    assert (small_site / "methods" / "example" / "smoke" / "index.html").is_file()  # the rendered notebook


def test_script_and_ampersand_in_the_catalog_are_escaped_in_generated_html_and_svg(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    entry = root / "catalog" / "training-time" / "example.yaml"
    hostile_name = "<script>alert(1)</script> & Co"
    entry.write_text(entry.read_text("utf-8").replace('"Ex<i>ample</i> $x$"', json.dumps(hostile_name)), "utf-8")
    taxonomy = root / "catalog" / "taxonomy.yaml"
    family = "Adversarial <script>alert(2)</script> & fine-tuning"
    renamed = taxonomy.read_text("utf-8").replace("name: Adversarial fine-tuning", f"name: {family}")
    taxonomy.write_text(renamed, "utf-8")
    docs = tmp_path / "docs"
    site.generate(root, docs)

    escaped_name = "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co"
    sweep = (docs / "assets" / "plots" / "methods" / "example-smoke.svg").read_text("utf-8")
    assert f">{escaped_name} — smoke profile</text>" in sweep  # the title
    assert f">{escaped_name}</text>" in sweep  # the legend
    diagram = (docs / "assets" / "paradigms.svg").read_text("utf-8")
    assert ">Adversarial &lt;script&gt;alert(2)&lt;/script&gt; &amp; fine-tuning</text>" in diagram
    for svg in (sweep, diagram):
        assert "<script>" not in svg and " & " not in svg
        ET.fromstring(svg)  # well-formed: every & and < of the catalog is an entity

    page = (docs / "methods" / "example.md").read_text("utf-8")
    subtitle = html.escape(HOSTILE_TITLE, quote=False)
    assert f'<p class="vlmd-subtitle">{subtitle}</p>' in page  # HTML in Markdown: escaped by the engine
    assert f"# {escaped_name}" in page  # Markdown text: HTML and Markdown syntax escaped
    for generated in docs.rglob("*.md"):
        text = generated.read_text("utf-8")
        assert "<script>" not in text.split("```bibtex")[0], generated  # a fenced code block shows it as text


def test_broken_internal_link_fails_the_strict_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_root(tmp_path / "root")
    original = site.schema_page

    def with_broken_link(w: render.Writer) -> None:
        original(w)
        w.page("broken.md", "Broken", "# Broken\n\n[nowhere](no-such-page.md)")

    monkeypatch.setattr(site, "schema_page", with_broken_link)
    with pytest.raises(SiteBuildError, match=r"no-such-page\.md"):
        build_site(REPO / "mkdocs.yml", tmp_path / "out", data_root=root)


def test_invalid_result_fails_the_build(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    (root / "reproductions" / "example" / "smoke" / "result.json").write_text("{}", encoding="utf-8")
    with pytest.raises(site.SiteError, match=r"result\.json"):
        site.generate(root, tmp_path / "docs")


def test_strict_build_of_the_real_catalog(real_site: Path) -> None:
    index = json.loads((real_site / "search" / "search_index.json").read_text(encoding="utf-8"))
    titles = {doc["location"]: doc["title"] for doc in index["docs"]}
    texts = {doc["location"]: doc["text"] for doc in index["docs"]}
    for entry in real_entries():
        assert (real_site / "methods" / entry.id / "index.html").is_file()
        assert titles[f"methods/{entry.id}/"] == html.escape(entry.name, quote=False)
        assert html.escape(entry.title, quote=False) in texts[f"methods/{entry.id}/"]
    assert (real_site / "compare" / "index.html").is_file() and (real_site / "results" / "index.html").is_file()


# --------------------------------------------------------------------------------------------------
# Browser tests


@pytest.fixture(scope="module")
def chromium_browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        if not os.environ.get("CI"):
            pytest.skip(f"{CHROMIUM} not found (install it with `make chromium`); browser tests skipped outside CI")
        pytest.fail(f"CI is set but {CHROMIUM} is missing: `make test` installs it through `make chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def serve(directory: Path) -> Iterator[str]:
    server = make_server(directory, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def real_url(real_site: Path) -> Iterator[str]:
    yield from serve(real_site)


@pytest.fixture(scope="module")
def small_url(small_site: Path) -> Iterator[str]:
    yield from serve(small_site)


@pytest.fixture
def tab(chromium_browser, request: pytest.FixtureRequest) -> Iterator[object]:
    """A page (1400×1000) that fails the test on a JavaScript error and screenshots itself at the end."""
    page = chromium_browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    page.close()
    assert not errors, errors


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.mark.browser
def test_home_to_method_through_the_taxonomy(tab, real_url: str) -> None:
    entry = real_entries()[0]
    tab.goto(real_url)
    assert "VLM Defense Atlas" in tab.title()
    assert tab.locator("article img[src$='paradigms.svg']").evaluate("img => img.naturalWidth") > 0
    shot(tab, "home")
    tab.locator("article a", has_text="taxonomy").first.click()
    tab.wait_for_url(re.compile(r"/taxonomy/$"))
    tab.locator("article h2 a").first.click()
    tab.wait_for_url(re.compile(rf"/taxonomy/{entry.paradigm.value}/$"))
    tab.locator(f"article a[href$='methods/{entry.id}/']").first.click()
    tab.wait_for_url(re.compile(rf"/methods/{entry.id}/$"))
    assert tab.locator("article h1").inner_text().strip().rstrip("¶") == entry.name
    assert entry.title in tab.locator("article").inner_text()
    assert tab.locator("article pre code").last.inner_text().startswith("@")  # the BibTeX block
    tab.locator("article button[title='Copy to clipboard']").last.wait_for()  # its copy button


@pytest.mark.browser
@pytest.mark.parametrize("field", ["name", "title"])
def test_search_finds_a_method(tab, real_url: str, field: str) -> None:
    entry = next(e for e in real_entries() if e.id == "tecoa") if field == "title" else real_entries()[-1]
    # Material's search reads "-word" as "without word", and boosts words in page titles 1000x (pages
    # titled "Adversarial ..." would outrank the method and push it out of the rendered results):
    # type the title's words apart, leaving out those that are common in page titles.
    common = {"adversarial", "robustness", "for", "of", "the", "a"}
    words = [w for w in entry.title.replace("-", " ").split() if w.lower() not in common]
    query = entry.name if field == "name" else " ".join(words)
    tab.goto(real_url)
    tab.locator("input.md-search__input").click()
    tab.locator("input.md-search__input").press_sequentially(query, delay=20)
    hit = tab.locator(f".md-search-result a[href*='/methods/{entry.id}/?']").first
    hit.wait_for(timeout=60_000)  # the search index loads in a web worker: slow on a loaded machine
    shot(tab, f"search-{field}")
    hit.click()
    tab.wait_for_url(re.compile(rf"/methods/{entry.id}/"))


@pytest.mark.browser
def test_compare_table_sorts_and_filters(tab, real_url: str) -> None:
    tab.goto(real_url + "compare/")
    table = tab.locator(".vlmd-compare table")
    headers = [h.strip() for h in table.locator("thead th").all_inner_texts()]
    year = headers.index("Year")

    def column(index: int) -> list[str]:
        return [c.strip() for c in table.locator(f"tbody tr:not([hidden]) td:nth-child({index + 1})").all_inner_texts()]

    table.locator("thead th").nth(year).click()
    years = [int(y) for y in column(year)]
    assert years == sorted(years)
    table.locator("thead th").nth(year).click()
    assert [int(y) for y in column(year)] == sorted(years, reverse=True)
    assert table.locator("thead th").nth(year).get_attribute("aria-sort") == "descending"
    tab.locator(".vlmd-filters select[data-filter-column='Paradigm']").select_option("training-free")
    paradigm = headers.index("Paradigm")
    assert set(column(paradigm)) == {"training-free"}
    entry = real_entries()[0]
    tab.locator(".vlmd-filters select[data-filter-column='Paradigm']").select_option("")
    tab.locator(".vlmd-filters input[data-filter-text]").fill(entry.name)
    names = column(0)
    assert entry.name in names and len(names) < len(real_entries())
    assert re.match(rf"{len(names)} of {len(real_entries())} methods", tab.locator(".vlmd-count").inner_text())


@pytest.mark.browser
def test_plots_load_and_html_stays_text(tab, small_url: str) -> None:
    tab.goto(small_url + "results/")
    images = tab.locator("article img")
    assert images.count() >= 3  # ε sweep, gain vs cost, seen vs unseen (no test-time method in this root)
    widths = images.evaluate_all("imgs => imgs.map(img => img.complete ? img.naturalWidth : 0)")
    assert all(w > 0 for w in widths), widths
    tab.goto(small_url + "methods/example/")
    tab.wait_for_load_state("load")
    assert tab.locator("article img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")[0] > 0
    assert PAYLOAD in tab.locator("article").inner_text()
    assert tab.evaluate("window.__pwned") is None
    shot(tab, "method-with-result")
    tab.get_by_role("link", name="Executed notebook (smoke)").click()
    tab.wait_for_url(re.compile(r"/methods/example/smoke/$"))
    assert "smoke numbers" in tab.locator("article").inner_text()


def executed_notebook_pages() -> list[tuple[str, str]]:
    """(URL path, label) of every committed executed notebook's page on the real site."""
    pages = []
    for notebook in sorted((REPO / "reproductions").glob("*/*/*.ipynb")):
        method, profile = notebook.parent.parent.name, notebook.parent.name
        where = f"baseline/{profile}/" if method == "baseline" else f"methods/{method}/{profile}/"
        pages.append((where, f"{method}-{profile}"))
    return pages


@pytest.mark.browser
def test_every_executed_notebook_page_reads_clean(tab, real_url: str) -> None:
    pages = executed_notebook_pages()
    assert pages
    for where, label in pages:
        tab.goto(real_url + where)
        tab.wait_for_load_state("load")
        text = tab.locator("article").inner_text()
        for noise in ("site-packages", "it/s]", "s/it]", "TqdmWarning", "Traceback", str(REPO)):
            assert noise not in text, f"{where}: {noise!r} on the page"
        assert "Evaluation checks" in text and "Evaluation audit" in text, where
        broken = tab.locator("article img").evaluate_all("imgs => imgs.filter(i => !i.naturalWidth).length")
        assert broken == 0, f"{where}: {broken} image(s) did not load"
        shot(tab, f"notebook-{label}")
