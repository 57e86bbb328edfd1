"""Benchmark: the strict site build of the full catalog, against a bare MkDocs build of an empty site.

Run: python benchmarks/bench_site.py [--repeats 3] [--simulate-results]

Each build runs in a fresh Python process (as `vlmdefense site build` does), so imports count. Prints, per
build, the best wall-clock seconds and the CPU seconds of that run (user + system: a load-independent figure
on a shared machine), and the ratio of the atlas build to the reference measured in the same run. The goal
is <= 15 s wall clock on 2 cores. The notebook cache of mkdocs-jupyter is cleared before every atlas build,
so each one converts every executed notebook (a cold build).

--simulate-results also builds a copy of the repository's data in which every catalog method has a smoke
result and an executed notebook (copies of the baseline's): the site as it will be once everything is
reproduced.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_CACHE = REPO / ".cache" / "mkdocs-jupyter"
QUIET = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}  # MkDocs/theme banners

ATLAS = """
import sys
from pathlib import Path
from vlmdefense.site.cli import build_site
build_site(Path(sys.argv[1]), Path(sys.argv[2]), data_root=Path(sys.argv[3]))
"""


def timed(command: list[str], repeats: int, before=None) -> tuple[float, float]:
    """Best wall-clock seconds over ``repeats`` runs, and the CPU seconds of that run."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        if before is not None:
            before()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, env=QUIET)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        best = min(best, (wall, cpu))
    return best


def bare_site(folder: Path) -> Path:
    """An empty Material site: one page, the search plugin."""
    (folder / "docs").mkdir(parents=True)
    (folder / "docs" / "index.md").write_text("# Empty\n", encoding="utf-8")
    config = folder / "mkdocs.yml"
    config.write_text("site_name: Empty\ntheme:\n  name: material\n  font: false\nplugins: [search]\n", "utf-8")
    return config


def simulated_root(folder: Path) -> tuple[Path, int]:
    """A copy of catalog/ and reproductions/ where every catalog method has the baseline's smoke result."""
    from vlmdefense.catalog.validation import load_catalog

    shutil.copytree(REPO / "catalog", folder / "catalog")
    shutil.copytree(REPO / "reproductions", folder / "reproductions")
    source = folder / "reproductions" / "baseline" / "smoke"
    record = json.loads((source / "result.json").read_text(encoding="utf-8"))
    catalog, _ = load_catalog(folder / "catalog")
    count = 0
    for method in catalog.items:
        target = folder / "reproductions" / method / "smoke"
        if (target / "result.json").is_file():
            continue
        target.mkdir(parents=True, exist_ok=True)
        (target / "result.json").write_text(json.dumps({**record, "method": method}, indent=2), encoding="utf-8")
        shutil.copyfile(source / "baseline.ipynb", target / f"{method}.ipynb")
        count += 1
    return folder, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--simulate-results", action="store_true")
    args = parser.parse_args()

    def clear_cache() -> None:
        shutil.rmtree(NOTEBOOK_CACHE, ignore_errors=True)

    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-site-") as tmp:
        tmp_path = Path(tmp)
        config = bare_site(tmp_path / "bare")
        reference = timed(
            [python, "-m", "mkdocs", "build", "-q", "-f", str(config), "-d", str(tmp_path / "bare-out")], args.repeats
        )
        roots = {"atlas (repository data)": REPO}
        if args.simulate_results:
            root, added = simulated_root(tmp_path / "simulated")
            roots[f"atlas (+{added} simulated results)"] = root
        print(f"{os.cpu_count()} CPUs; best of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
        print(f"{'build':<36} {'wall (s)':>9} {'cpu (s)':>8} {'÷ reference':>12}")
        print(f"{'bare mkdocs build (reference)':<36} {reference[0]:>9.2f} {reference[1]:>8.2f} {1.0:>12.2f}")
        for label, root in roots.items():
            command = [python, "-c", ATLAS, str(REPO / "mkdocs.yml"), str(tmp_path / "out"), str(root)]
            wall, cpu = timed(command, args.repeats, before=clear_cache)
            print(f"{label:<36} {wall:>9.2f} {cpu:>8.2f} {wall / reference[0]:>12.2f}")
    print("goal: the atlas build <= 15 s wall clock on 2 cores")


if __name__ == "__main__":
    main()
