"""BibTeX records generated from catalog entries."""

from __future__ import annotations

import re
import unicodedata

from vlmdefense.catalog.schema import Entry

JOURNAL_WORDS = ("transactions", "journal", "tpami", "tifs", "tip", "ijcv", "pattern recognition")
STOP_WORDS = {"a", "an", "the", "on", "of", "for", "to", "in", "is", "are", "and", "towards", "toward"}


def _ascii_word(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9]", "", folded)


def citation_key(entry: Entry) -> str:
    """``lastnameYEARfirstword``, e.g. ``mao2023understanding``."""
    last = _ascii_word(entry.authors[0].split()[-1]).lower() or "anon"
    words = [_ascii_word(w).lower() for w in entry.title.split()]
    first = next((w for w in words if w and w not in STOP_WORDS), "untitled")
    return f"{last}{entry.year}{first}"


def _escape(text: str) -> str:
    return re.sub(r"([&%$#_])", r"\\\1", text)


def bibtex(entry: Entry) -> str:
    """The BibTeX record of ``entry``: ``@inproceedings``, ``@article`` or ``@misc`` (arXiv)."""
    venue = entry.venue.strip()
    is_arxiv = venue.lower().startswith("arxiv")
    is_journal = any(word in venue.lower() for word in JOURNAL_WORDS)
    kind = "misc" if is_arxiv else "article" if is_journal else "inproceedings"
    fields: list[tuple[str, str]] = [
        ("title", "{" + _escape(entry.title) + "}"),
        ("author", " and ".join(_escape(a) for a in entry.authors)),
        ("year", str(entry.year)),
    ]
    if kind == "inproceedings":
        fields.append(("booktitle", _escape(venue)))
    elif kind == "article":
        fields.append(("journal", _escape(venue)))
    if entry.links.arxiv:
        fields += [("eprint", entry.links.arxiv), ("archivePrefix", "arXiv")]
    if entry.links.doi:
        fields.append(("doi", entry.links.doi))
    url = entry.links.paper or (f"https://arxiv.org/abs/{entry.links.arxiv}" if entry.links.arxiv else None)
    if url:
        fields.append(("url", url))
    body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields)
    return f"@{kind}{{{citation_key(entry)},\n{body}\n}}\n"
