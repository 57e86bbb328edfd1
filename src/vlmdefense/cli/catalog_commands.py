"""Catalog commands: validate, list, show, bibtex, new, schema."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vlmdefense.catalog.bibtex import bibtex
from vlmdefense.catalog.scaffold import ScaffoldError, new_entry, new_notebook
from vlmdefense.catalog.schema import Entry, Paradigm, schema_text
from vlmdefense.catalog.validation import load_catalog
from vlmdefense.cli.common import BASELINE, CatalogOption, OutputFormat, app, fail, open_catalog, out
from vlmdefense.fileio import atomic_write_text
from vlmdefense.problems import ProblemsError


@app.command()
def validate(
    catalog_dir: Annotated[Path, typer.Argument(help="Catalog directory.")] = Path("catalog"),
) -> None:
    """Check every catalog file against the schema and the taxonomy, and every result file beside it
    (reproductions/*/*/result.json: schema, provenance, known method and profile); report all problems."""
    catalog, problems = load_catalog(catalog_dir)
    results = 0
    root = catalog_dir.resolve().parent
    if catalog is not None and (root / "reproductions" / "profiles.yaml").is_file():
        from vlmdefense.runs.runner import check_results, result_files

        results = len(result_files(root))
        try:
            problems = problems + check_results(root, set(catalog.items) | {BASELINE})
        except ProblemsError as exc:
            problems = problems + exc.problems
    for problem in problems:
        out.print(str(problem), highlight=False, markup=False)
    if problems:
        files = len({p.path for p in problems})
        fail(f"{len(problems)} problem(s) in {files} file(s)")
    assert catalog is not None
    counts = {p.value: 0 for p in Paradigm}
    for entry in catalog.entries:
        counts[entry.paradigm.value] += 1
    detail = ", ".join(f"{n} {name}" for name, n in counts.items())
    tail = f"; {results} result file(s) ok" if results else ""
    out.print(f"catalog ok: {len(catalog.entries)} entries ({detail}){tail}", highlight=False)


def _flags(entry: Entry) -> str:
    a = entry.assumptions
    names = [
        ("randomized", a.randomized),
        ("optimizes", a.inference_time_optimization),
        ("non-diff", a.non_differentiable),
    ]
    return ",".join(name for name, on in names if on)


def _reported_text(entry: Entry) -> str:
    return "; ".join(
        f"{r.model} | {r.dataset} | {r.attack} | {r.norm.value} {r.eps.display} | "
        f"clean {r.clean if r.clean is not None else '-'} / robust "
        f"{r.robust if r.robust is not None else '-'} | {r.source}"
        for r in entry.reported
    )


CSV_COLUMNS = [
    "id",
    "name",
    "paradigm",
    "family",
    "title",
    "authors",
    "year",
    "venue",
    "arxiv",
    "doi",
    "code",
    "modifies_weights",
    "needs_labels",
    "test_time_gradients",
    "randomized",
    "inference_time_optimization",
    "non_differentiable",
    "cost_level",
    "training_cost",
    "inference_cost",
    "threat_model",
    "reported",
    "reproduction",
    "related",
    "sources",
]


def _csv_row(entry: Entry) -> list[str]:
    a = entry.assumptions
    threat = (
        f"{'/'.join(n.value for n in entry.threat_model.norms)} "
        + ", ".join(e.display for e in entry.threat_model.eps)
        + f" ({', '.join(entry.threat_model.attacks)})"
    )
    return [
        entry.id,
        entry.name,
        entry.paradigm.value,
        entry.family,
        entry.title,
        "; ".join(entry.authors),
        str(entry.year),
        entry.venue,
        entry.links.arxiv or "",
        entry.links.doi or "",
        entry.links.code or "",
        str(a.modifies_weights).lower(),
        "not stated" if a.needs_labels is None else str(a.needs_labels).lower(),
        str(a.test_time_gradients).lower(),
        str(a.randomized).lower(),
        str(a.inference_time_optimization).lower(),
        str(a.non_differentiable).lower(),
        entry.cost.level.value,
        entry.cost.training,
        entry.cost.inference,
        threat,
        _reported_text(entry),
        entry.reproduction.status.value,
        " ".join(entry.related),
        " ".join(entry.sources),
    ]


@app.command("list")
def list_(
    paradigm: Annotated[Paradigm | None, typer.Option(help="Only this paradigm.")] = None,
    family: Annotated[str | None, typer.Option(help="Only this family.")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
    catalog_dir: CatalogOption = Path("catalog"),
) -> None:
    """List the catalog's defenses."""
    catalog = open_catalog(catalog_dir)
    families = {f.id for info in catalog.taxonomy.paradigms for f in info.families}
    if family is not None and family not in families:
        fail(f"unknown family {family!r} (one of: {', '.join(sorted(families))})", code=2)
    entries = [
        e
        for e in catalog.entries
        if (paradigm is None or e.paradigm == paradigm) and (family is None or e.family == family)
    ]
    if fmt is OutputFormat.json:
        payload = [
            {**e.model_dump(mode="json"), "needs_adaptive_evaluation": e.needs_adaptive_evaluation} for e in entries
        ]
        sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        return
    if fmt is OutputFormat.csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(_csv_row(e) for e in entries)
        sys.stdout.write(buffer.getvalue())
        return
    table = Table(title=f"{len(entries)} defenses", show_lines=False)
    for column in ("id", "name", "paradigm", "family", "venue", "cost", "flags", "repro"):
        table.add_column(column, overflow="fold")
    for e in entries:
        table.add_row(
            e.id,
            e.name,
            e.paradigm.value,
            e.family,
            e.venue,
            e.cost.level.value,
            _flags(e),
            e.reproduction.status.value,
        )
    out.print(table)


@app.command()
def show(
    method_id: Annotated[str, typer.Argument(metavar="ID", help="Method id.")],
    catalog_dir: CatalogOption = Path("catalog"),
) -> None:
    """Show one defense in full."""
    catalog = open_catalog(catalog_dir)
    try:
        entry = catalog.get(method_id)
    except KeyError as exc:
        fail(str(exc.args[0]))
    out.print(f"[bold]{entry.name}[/] — {entry.title}", highlight=False)
    out.print(f"{', '.join(entry.authors)}. {entry.venue}.", highlight=False, markup=False)
    out.print(f"{entry.paradigm.value} / {entry.family}", highlight=False)
    links = {k: v for k, v in entry.links.model_dump().items() if v}
    for key, value in links.items():
        out.print(f"  {key}: {value}", highlight=False, markup=False)
    out.print("\n[bold]Summary[/]")
    out.print(entry.summary, markup=False)
    out.print("\n[bold]Mechanism[/]")
    out.print(entry.mechanism, markup=False)
    out.print("\n[bold]Assumptions and cost[/]")
    for key, value in entry.assumptions.model_dump(mode="json").items():
        out.print(f"  {key}: {value}", highlight=False, markup=False)
    for key, value in entry.cost.model_dump(mode="json").items():
        if value is not None:
            out.print(f"  cost.{key}: {value}", highlight=False, markup=False)
    if entry.needs_adaptive_evaluation:
        out.print("  [yellow]needs adaptive evaluation before it is ranked[/]")
    if entry.reported:
        table = Table(title="Reported by the paper")
        for column in ("model", "dataset", "attack", "ε", "clean", "robust", "source"):
            table.add_column(column, overflow="fold")
        for r in entry.reported:
            table.add_row(
                r.model,
                r.dataset,
                r.attack,
                f"{r.norm.value} {r.eps.display}",
                "-" if r.clean is None else f"{r.clean:g}",
                "-" if r.robust is None else f"{r.robust:g}",
                r.source,
            )
        out.print(table)
    out.print(f"\nreproduction: {entry.reproduction.status.value}", highlight=False)
    if entry.related:
        out.print(f"related: {', '.join(entry.related)}", highlight=False)


@app.command("bibtex")
def bibtex_(
    method_ids: Annotated[
        list[str] | None, typer.Argument(metavar="[ID...]", help="Method ids (default: all).")
    ] = None,
    catalog_dir: CatalogOption = Path("catalog"),
) -> None:
    """Print BibTeX records for the given methods (all when none is given)."""
    catalog = open_catalog(catalog_dir)
    try:
        entries = [catalog.get(i) for i in method_ids] if method_ids else catalog.entries
    except KeyError as exc:
        fail(str(exc.args[0]))
    sys.stdout.write("\n".join(bibtex(e) for e in entries))


@app.command()
def new(
    method_id: Annotated[str, typer.Argument(metavar="ID", help="New method id, e.g. my-defense.")],
    paradigm: Annotated[Paradigm, typer.Option(help="Paradigm (the entry's folder).")],
    family: Annotated[str, typer.Option(help="Family of that paradigm (see catalog/taxonomy.yaml).")],
    notebook: Annotated[
        bool, typer.Option("--notebook/--no-notebook", help="Also create notebooks/ID.ipynb from the template.")
    ] = True,
    catalog_dir: CatalogOption = Path("catalog"),
) -> None:
    """Scaffold a commented catalog entry (and its notebook) whose TODOs fail validation until filled."""
    notebooks = catalog_dir.resolve().parent / "notebooks"
    if notebook and (notebooks / f"{method_id}.ipynb").exists():
        fail(f"notebook {notebooks / f'{method_id}.ipynb'} exists already")
    if notebook and not (notebooks / "_template.ipynb").is_file():
        fail(f"notebook template {notebooks / '_template.ipynb'} not found (use --no-notebook for the YAML alone)")
    try:
        path = new_entry(catalog_dir, method_id, paradigm.value, family)
        made = [path]
        if notebook:
            made.append(new_notebook(catalog_dir.resolve().parent, method_id))
    except (ScaffoldError, ProblemsError) as exc:
        fail(str(exc))
    for item in made:
        out.print(f"created {item}", highlight=False)
    out.print(
        "next: fill in every TODO of the YAML and the notebook, run `vlmdefense validate`, "
        f"then `vlmdefense check {method_id}`",
        highlight=False,
    )


@app.command()
def schema(
    write: Annotated[
        bool,
        typer.Option("--write", help="Write CATALOG/schema.json and CATALOG/result.schema.json instead of printing."),
    ] = False,
    result: Annotated[bool, typer.Option("--result", help="Print the schema of result.json instead.")] = False,
    catalog_dir: CatalogOption = Path("catalog"),
) -> None:
    """Print (or write) the JSON Schemas of a catalog entry and of a result record, exported from the pydantic
    models."""
    from vlmdefense.runs.records import RESULT_SCHEMA_FILE, result_schema_text

    if write:
        for name, text in (("schema.json", schema_text()), (RESULT_SCHEMA_FILE, result_schema_text())):
            target = catalog_dir / name
            atomic_write_text(target, text)
            out.print(f"wrote {target}", highlight=False)
    else:
        sys.stdout.write(result_schema_text() if result else schema_text())
