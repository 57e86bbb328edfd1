"""``catalog/survey.yaml``: the survey whose paradigms the atlas follows, and how they map onto ours."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from vlmdefense.catalog.documents import validate_document
from vlmdefense.catalog.schema import ARXIV_PATTERN, Links, MethodId, Paradigm, StrictModel, Taxonomy, Text, Url
from vlmdefense.catalog.yaml_source import load_yaml_mapping
from vlmdefense.problems import Problem, ProblemsError

SURVEY_FILE = "survey.yaml"


class SurveyCategory(StrictModel):
    """One of the survey's categories and the paradigm and families of the atlas it corresponds to."""

    survey_name: Text = Field(description="the survey's own name for the category")
    our_paradigm: Paradigm
    our_families: list[MethodId] = Field(min_length=1)
    note: Text


class Survey(StrictModel):
    """The survey the taxonomy follows (a page of the site, cited from the home page)."""

    title: Text
    authors: list[Text] = Field(min_length=1)
    year: int = Field(ge=2015, le=2100, strict=True)
    venue: Text
    arxiv: str | None = Field(None, pattern=ARXIV_PATTERN)
    links: Links
    summary: Text
    paradigms: list[SurveyCategory] = Field(min_length=1)
    bibtex: Text
    sources: list[Url] = Field(min_length=1)


def load_survey(root: Path, taxonomy: Taxonomy | None) -> tuple[Survey | None, list[Problem]]:
    """The survey of the catalog at ``root`` (``None`` when there is no survey file), with its problems:
    schema, and families that the taxonomy does not place in the stated paradigm."""
    path = Path(root) / SURVEY_FILE
    if not path.is_file():
        return None, []
    try:
        doc = load_yaml_mapping(path)
    except ProblemsError as exc:
        return None, list(exc.problems)
    survey, problems = validate_document(doc, Survey)
    if survey is None or taxonomy is None:
        return survey, problems
    for i, category in enumerate(survey.paradigms):
        known = taxonomy.families_of(category.our_paradigm)
        for j, family in enumerate(category.our_families):
            if family not in known:
                message = f"family {family!r} is not in paradigm {category.our_paradigm.value!r} of the taxonomy"
                problems.append(doc.problem(("paradigms", i, "our_families", j), message))
    return survey, problems
