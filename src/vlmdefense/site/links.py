"""Where each generated page and plot lives in the docs tree, and relative links between them."""

from __future__ import annotations

PLOTS = "assets/plots"


def method_page(entry_id: str) -> str:
    return f"methods/{entry_id}.md"


def paradigm_page(paradigm: str) -> str:
    return f"taxonomy/{paradigm}/index.md"


def family_page(paradigm: str, family: str) -> str:
    return f"taxonomy/{paradigm}/{family}.md"


def method_plot(entry_id: str, profile: str) -> str:
    return f"{PLOTS}/methods/{entry_id}-{profile}.svg"


def rel(from_page: str, target: str) -> str:
    """A relative link from one docs file to another (MkDocs resolves and checks it)."""
    depth = from_page.count("/")
    return "../" * depth + target
