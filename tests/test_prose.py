"""Numbers in a notebook's prose come from the record: look-ups by meaning, formatted as the prose writes them."""

from __future__ import annotations

from conftest import REPO
from vlmdefense.runs.records import read_result
from vlmdefense.workbench.prose import Numbers, pct

TECOA = REPO / "reproductions" / "tecoa" / "smoke" / "result.json"


def test_lookups_read_the_record() -> None:
    result = read_result(TECOA)
    r = Numbers(result)
    assert result.clean is not None and r.clean("seen") == pct(result.clean.seen)
    pgd = [x for x in result.robust if x.attack == "PGD-10" and x.eps.display == "8/255"]
    assert r.robust("8/255", "seen", attack="PGD-10") == pct(pgd[0].acc.seen)
    at8 = [x.acc.all for x in result.robust if x.eps.display == "8/255" and x.acc.all is not None]
    assert r.robust("8/255") == pct(min(at8))
    sweep = sorted((x for x in result.robust if x.attack == "PGD-10"), key=lambda x: x.eps.value)
    assert r.sweep() == " / ".join(f"{x.acc.all:.1f}" for x in sweep)
    assert r.finding("first_epoch", "epoch") == 1
    assert r.value("last_epoch", "train_adv_acc", percent=True).endswith(" %")


def test_a_missing_record_or_value_reads_n_a() -> None:
    assert Numbers(None).robust("8/255") == "n/a" and Numbers(None).sweep() == "n/a"
    assert Numbers(read_result(TECOA)).robust("3/255") == "n/a"
    assert Numbers(read_result(TECOA)).value("no", "such", "finding") == "n/a"
