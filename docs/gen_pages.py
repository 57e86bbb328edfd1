"""mkdocs-gen-files script: generate the atlas' pages from catalog/ and reproductions/ at build time.

The data root is the repository holding this file, or ``$VLMDEFENSE_SITE_ROOT`` (tests build sites of
temporary catalogs that way). Pages, plots and executed notebooks come from :func:`vlmdefense.site.build.generate`;
this script copies them into MkDocs' virtual docs tree and sets the navigation.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mkdocs_gen_files
from mkdocs.exceptions import PluginError

from vlmdefense.site.build import ROOT_ENV, SiteError, generate

root = Path(os.environ.get(ROOT_ENV) or Path(__file__).resolve().parents[1])
editor = mkdocs_gen_files.FilesEditor.current()
with tempfile.TemporaryDirectory(prefix="vlmdefense-site-") as tmp:
    try:
        generated = generate(root, Path(tmp) / "docs")
    except SiteError as exc:
        raise PluginError(str(exc)) from exc
    for name in generated.files:
        with mkdocs_gen_files.open(name, "wb") as target:
            target.write((generated.out / name).read_bytes())
editor.config["nav"] = generated.nav
