"""Load and validate the whole catalog, collecting every problem with its file, line and field."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from vlmdefense.catalog.documents import validate_document
from vlmdefense.catalog.schema import Entry, Paradigm, Taxonomy
from vlmdefense.catalog.survey import SURVEY_FILE, load_survey
from vlmdefense.catalog.yaml_source import Loc, YamlDocument, load_yaml_mapping
from vlmdefense.problems import Problem, ProblemsError, display_path

logger = logging.getLogger(__name__)

TAXONOMY_FILE = "taxonomy.yaml"
ALLOWED_TOP_LEVEL = {TAXONOMY_FILE, SURVEY_FILE, "schema.json", "result.schema.json", "README.md"}


@dataclass(frozen=True)
class CatalogEntry:
    """A validated entry and the document it came from (for line numbers)."""

    entry: Entry
    doc: YamlDocument

    @property
    def path(self) -> Path:
        """The entry's YAML file."""
        return self.doc.path


@dataclass
class Catalog:
    """The taxonomy and all valid entries of a catalog directory."""

    root: Path
    taxonomy: Taxonomy
    items: dict[str, CatalogEntry] = field(default_factory=dict)

    @property
    def entries(self) -> list[Entry]:
        """All entries, sorted by paradigm (taxonomy order), then name."""
        order = {info.id: i for i, info in enumerate(self.taxonomy.paradigms)}
        return sorted(
            (item.entry for item in self.items.values()),
            key=lambda e: (order.get(e.paradigm, 99), e.name.lower()),
        )

    def get(self, method_id: str) -> Entry:
        """The entry with ``method_id``.

        Raises:
            KeyError: with a did-you-mean message when the id is unknown.
        """
        if method_id in self.items:
            return self.items[method_id].entry
        raise KeyError(unknown_id_message(method_id, list(self.items)))


def unknown_id_message(method_id: str, known: list[str]) -> str:
    """``no method 'x' in the catalog (did you mean 'y'?)``."""
    close = difflib.get_close_matches(method_id, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"no method {method_id!r} in the catalog{hint}"


def load_taxonomy(root: Path) -> Taxonomy:
    """Load ``root/taxonomy.yaml``.

    Raises:
        ProblemsError: the file is missing or invalid.
    """
    path = root / TAXONOMY_FILE
    if not path.is_file():
        raise ProblemsError([Problem(display_path(path), 1, "-", "taxonomy file not found")])
    doc = load_yaml_mapping(path)
    taxonomy, problems = validate_document(doc, Taxonomy)
    if problems:
        raise ProblemsError(problems)
    return taxonomy


def _entry_files(root: Path) -> tuple[list[Path], list[Problem]]:
    files: list[Path] = []
    problems: list[Problem] = []
    paradigms = {p.value for p in Paradigm}
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            if child.name not in paradigms:
                problems.append(
                    Problem(
                        display_path(child),
                        1,
                        "-",
                        f"unknown paradigm folder (expected one of: {', '.join(sorted(paradigms))})",
                    )
                )
            for path in sorted(child.iterdir()):
                if path.suffix == ".yaml":
                    files.append(path)
                elif not path.name.startswith("."):
                    problems.append(Problem(display_path(path), 1, "-", "not a catalog entry: entries end in .yaml"))
        elif child.name not in ALLOWED_TOP_LEVEL:
            problems.append(
                Problem(
                    display_path(child), 1, "-", "entries belong in a paradigm folder: catalog/<paradigm>/<id>.yaml"
                )
            )
    return files, problems


def _check_placement(item: CatalogEntry, taxonomy: Taxonomy | None) -> list[Problem]:
    entry, doc = item.entry, item.doc
    problems = []
    if entry.id != doc.path.stem:
        problems.append(doc.problem(("id",), f"id {entry.id!r} differs from the file name {doc.path.stem!r}"))
    if doc.path.parent.name != entry.paradigm.value:
        problems.append(
            doc.problem(
                ("paradigm",),
                f"entry of paradigm {entry.paradigm.value!r} is in folder "
                f"{doc.path.parent.name!r}: move it to catalog/{entry.paradigm.value}/",
            )
        )
    if taxonomy is not None:
        families = taxonomy.families_of(entry.paradigm)
        if entry.family not in families:
            owner = taxonomy.paradigm_of_family(entry.family)
            if owner is not None:
                message = f"family {entry.family!r} belongs to paradigm {owner.value!r}, not {entry.paradigm.value!r}"
            else:
                close = difflib.get_close_matches(entry.family, list(families), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"one of: {', '.join(families)}"
                message = f"unknown family {entry.family!r} ({hint})"
            problems.append(doc.problem(("family",), message))
    return problems


def _check_references(items: dict[str, CatalogEntry], repo_root: Path) -> list[Problem]:
    problems = []
    for item in items.values():
        entry, doc = item.entry, item.doc
        for index, other in enumerate(entry.related):
            loc: Loc = ("related", index)
            if other == entry.id:
                problems.append(doc.problem(loc, "an entry cannot be related to itself"))
            elif other not in items:
                problems.append(doc.problem(loc, unknown_id_message(other, list(items))))
            elif entry.id not in items[other].entry.related:
                problems.append(
                    doc.problem(
                        loc,
                        f"{other!r} does not list {entry.id!r} back under related "
                        "(related entries are linked both ways)",
                    )
                )
        notebook = entry.reproduction.notebook
        if notebook is not None and not (repo_root / notebook).is_file():
            problems.append(doc.problem(("reproduction", "notebook"), f"notebook {notebook!r} not found"))
    return problems


def load_catalog(root: Path) -> tuple[Catalog | None, list[Problem]]:
    """Load and validate every file of the catalog at ``root``.

    Returns:
        The catalog of valid entries (``None`` when the taxonomy itself is broken) and every problem
        found, sorted by file and line. Validation never stops at the first problem.
    """
    root = Path(root)
    if not root.is_dir():
        return None, [Problem(display_path(root), 1, "-", "catalog directory not found")]
    problems: list[Problem] = []
    taxonomy: Taxonomy | None
    try:
        taxonomy = load_taxonomy(root)
    except ProblemsError as exc:
        taxonomy, problems = None, list(exc.problems)
    files, found = _entry_files(root)
    problems += found
    items: dict[str, CatalogEntry] = {}
    by_id: dict[str, list[CatalogEntry]] = {}
    for path in files:
        try:
            doc = load_yaml_mapping(path)
        except ProblemsError as exc:
            problems += exc.problems
            continue
        entry, found = validate_document(doc, Entry)
        problems += found
        if entry is None:
            continue
        item = CatalogEntry(entry, doc)
        problems += _check_placement(item, taxonomy)
        by_id.setdefault(entry.id, []).append(item)
    for method_id, same in by_id.items():
        items[method_id] = same[0]
        if len(same) > 1:
            for item in same:
                others = ", ".join(display_path(o.path) for o in same if o is not item)
                problems.append(item.doc.problem(("id",), f"duplicate id {method_id!r} (also in {others})"))
    problems += _check_references(items, root.resolve().parent)
    problems += load_survey(root, taxonomy)[1]
    logger.debug("validated %d files, %d problems", len(files), len(problems))
    catalog = Catalog(root=root, taxonomy=taxonomy, items=items) if taxonomy is not None else None
    return catalog, sorted(set(problems))


def load_valid_catalog(root: Path) -> Catalog:
    """Load the catalog, raising on any problem.

    Raises:
        ProblemsError: the catalog holds at least one problem.
    """
    catalog, problems = load_catalog(root)
    if problems or catalog is None:
        raise ProblemsError(problems)
    return catalog
