"""The mutation score of a finished ``make mutation`` run, per module, and the survivors nobody has explained.

Reads the run's own result files (``mutants/**/*.py.meta`` in the scratch tree) and the verdicts kept in
``tests/mutation_verdicts.yaml`` (``mutant name: why it cannot change a number``). A surviving mutant is either
killed by a new test or explained there as equivalent; the last table lists the ones that are neither, and
verdicts whose mutant no longer survives are reported so the file stays current.

    python tests/mutation_score.py .cache/mutation-tree            # the score table
    python tests/mutation_score.py .cache/mutation-tree --survivors  # plus every unexplained survivor
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import yaml
from mutmut.stats import status_by_exit_code

VERDICTS = Path(__file__).with_name("mutation_verdicts.yaml")
DETECTED = ("killed", "timeout", "caught by type check")
COUNTED = (*DETECTED, "survived", "no tests")


def statuses(tree: Path) -> dict[str, dict[str, str]]:
    """``{module file: {mutant name: status}}`` from the run's ``.meta`` files."""
    found: dict[str, dict[str, str]] = {}
    for meta in sorted((tree / "mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        module = str(meta.relative_to(tree / "mutants")).removesuffix(".meta")
        found[module] = {name: status_by_exit_code[code] for name, code in codes.items()}
    return found


def load_verdicts(path: Path = VERDICTS) -> dict[str, str]:
    """The explained survivors: mutant name to the reason it is equivalent."""
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise SystemExit(f"{path}: expected 'mutant name: reason' entries with a non-empty reason")
    return {str(k): v for k, v in data.items()}


def score(counts: Counter[str]) -> float | None:
    """Detected mutants over all that ran or had no test (skipped and unchecked ones left out), in %."""
    total = sum(counts[s] for s in COUNTED)
    return None if total == 0 else 100.0 * sum(counts[s] for s in DETECTED) / total


def report(tree: Path, show_survivors: bool, verdicts_file: Path = VERDICTS) -> int:
    """Print the table; exit code 1 when a survivor is unexplained or a mutant was never checked."""
    by_module = statuses(tree)
    verdicts = load_verdicts(verdicts_file)
    survivors = {n for mutants in by_module.values() for n, s in mutants.items() if s == "survived"}
    unexplained = sorted(survivors - set(verdicts))
    print(f"{'module':58} {'killed':>7} {'timeout':>7} {'survived':>8} {'explained':>9} {'no tests':>8} {'score':>7}")
    overall: Counter[str] = Counter()
    for module, mutants in by_module.items():
        counts = Counter(mutants.values())
        overall.update(counts)
        explained = sum(1 for n, s in mutants.items() if s == "survived" and n in verdicts)
        value = score(counts)
        print(
            f"{module:58} {counts['killed'] + counts['caught by type check']:7} {counts['timeout']:7} "
            f"{counts['survived']:8} {explained:9} {counts['no tests']:8} "
            f"{'-' if value is None else f'{value:.1f} %':>7}"
        )
    total = score(overall)
    print(
        f"{'all':58} {'':7} {'':7} {overall['survived']:8} {len(survivors & set(verdicts)):9} {'':8} "
        f"{'-' if total is None else f'{total:.1f} %':>7}"
    )
    unchecked = overall["not checked"] + overall["suspicious"] + overall["segfault"]
    stale = sorted(set(verdicts) - survivors)
    print(f"\n{len(unexplained)} unexplained survivors, {unchecked} mutants not checked, {len(stale)} stale verdicts")
    if show_survivors:
        for name in unexplained:
            print(f"  survived: {name}")
        for name in stale:
            print(f"  stale verdict: {name}")
    return 1 if unexplained or unchecked else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", type=Path, help="the scratch tree the mutation run worked in")
    parser.add_argument("--survivors", action="store_true", help="list every unexplained survivor")
    args = parser.parse_args(argv)
    return report(args.tree, args.survivors)


if __name__ == "__main__":
    sys.exit(main())
