"""The leaderboard page: every evaluated checkpoint (``reproductions/checkpoints/``) ranked per suite profile and
ε by its average worst-case robust accuracy, with the audit's flags, and the paper's numbers beside ours."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmdefense.catalog.schema import Reported
from vlmdefense.runs.checkpoint_records import CheckpointResult
from vlmdefense.site.data import SiteData
from vlmdefense.site.render import Writer, render

LEADERBOARD_PAGE = "leaderboard.md"

#: How papers name the suite's datasets, by clip_benchmark's name (compared without case or punctuation).
DATASET_ALIASES: dict[str, tuple[str, ...]] = {
    "cars": ("stanfordcars", "cars"),
    "pets": ("oxfordpets", "oxfordiiitpet", "pets"),
    "flowers": ("flowers102", "oxfordflowers", "flowers"),
    "fgvc_aircraft": ("fgvcaircraft", "aircraft"),
    "imagenet1k": ("imagenet", "imagenet1k"),
    "imagenet_sketch": ("imagenetsketch",),
    "imagenet-r": ("imagenetr",),
}


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def same_dataset(suite_name: str, reported: str) -> bool:
    """Whether a reported row's dataset is the suite's dataset ``suite_name`` (clip_benchmark's name)."""
    return _key(reported) in DATASET_ALIASES.get(suite_name, (_key(suite_name),))


@dataclass
class Standing:
    """One checkpoint in one ranking: its averages and per-dataset worst cases at the ranking's ε."""

    rank: int
    result: CheckpointResult
    clean: float | None
    robust: float | None
    per_dataset: list[float | None]
    flags: list[str]


@dataclass
class Ranking:
    """The checkpoints of one suite profile at one ε, best robust average first."""

    profile: str
    description: str
    eps: str
    datasets: list[str]
    standings: list[Standing]


@dataclass
class PaperRow:
    """A reported number beside ours for the same weights, dataset (or average) and ε."""

    slug: str
    profile: str
    reported: Reported
    ours_clean: float | None
    ours_robust: float | None

    @property
    def delta(self) -> float | None:
        """Our robust accuracy minus the paper's (negative: we found the model less robust)."""
        if self.ours_robust is None or self.reported.robust is None:
            return None
        return round(self.ours_robust - self.reported.robust, 2)


def rankings(data: SiteData) -> list[Ranking]:
    """One ranking per (suite profile, ε) that has evaluations, profiles in file order."""
    out = []
    for profile in dict.fromkeys(r.profile for r in data.checkpoints):
        results = [r for r in data.checkpoints if r.profile == profile]
        description = str(data.suite_profiles.get(profile, {}).get("description", "")).strip()
        datasets = list(dict.fromkeys(d.dataset for r in results for d in r.datasets))
        budgets = dict.fromkeys(a.eps.display for r in results for a in r.averages)
        for eps in budgets:
            rows = []
            for r in results:
                average = next((a for a in r.averages if a.eps.display == eps), None)
                scores = {d.dataset: d.worst.get(eps) for d in r.datasets}
                rows.append(
                    Standing(
                        0,
                        r,
                        average.clean if average else None,
                        average.robust if average else None,
                        [scores.get(d) for d in datasets],
                        r.flags(),
                    )
                )
            rows.sort(key=lambda s: (s.robust is None, -(s.robust or 0.0), s.result.slug))
            for i, standing in enumerate(rows, start=1):
                standing.rank = i
            out.append(Ranking(profile, description, eps, datasets, rows))
    return out


def paper_rows(data: SiteData) -> list[PaperRow]:
    """Every reported number of an evaluated checkpoint's weights that one of our measurements matches: the same
    ε and the same dataset, or the suite average for a row that reports an average."""
    out = []
    for result in data.checkpoints:
        for row in result.reported:
            if row.dataset.lower().startswith("average"):
                average = result.average_at(row.eps.value)
                if average is not None:
                    out.append(PaperRow(result.slug, result.profile, row, average.clean, average.robust))
                continue
            for score in result.datasets:
                if same_dataset(score.dataset, row.dataset) and row.eps.display in score.worst:
                    out.append(PaperRow(result.slug, result.profile, row, score.clean, score.worst[row.eps.display]))
    return out


def leaderboard_page(data: SiteData, w: Writer) -> None:
    """Write ``leaderboard.md`` (an empty leaderboard says how to fill it)."""
    body = render("leaderboard.md.j2", rankings=rankings(data), paper=paper_rows(data))
    w.page(LEADERBOARD_PAGE, "Leaderboard", body, hide=("navigation",))
