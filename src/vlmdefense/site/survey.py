"""The survey page: what the survey the atlas follows covers, how its categories map onto the taxonomy."""

from __future__ import annotations

from vlmdefense.catalog.survey import load_survey
from vlmdefense.site.data import SiteData
from vlmdefense.site.links import family_page, paradigm_page
from vlmdefense.site.render import Writer, render

SURVEY_PAGE = "survey.md"


def survey_page(data: SiteData, w: Writer) -> bool:
    """Write ``survey.md`` when the catalog has a survey file; returns whether it did."""
    survey, _ = load_survey(data.catalog.root, data.catalog.taxonomy)
    if survey is None:
        return False
    taxonomy = data.catalog.taxonomy
    body = render(
        "survey.md.j2",
        survey=survey,
        taxonomy=taxonomy,
        paradigm_page=paradigm_page,
        family_page=family_page,
        family_name=lambda p, f: taxonomy.families_of(p)[f].name,
        paradigm_name=lambda p: taxonomy.paradigm(p).name,
    )
    w.page(SURVEY_PAGE, "The survey", body)
    return True
