"""benchmarks.allocation_quality end to end on stories260K with tiny settings: the JSON holds what the results
table reads, the plots are drawn, and the table renders it."""
import json

import pytest

from benchmarks import allocation_quality, tables
from conftest import TEXT

pytestmark = pytest.mark.usefixtures("one_thread")


def test_allocation_quality_report(stories_dir, tmp_path, monkeypatch):
    out = tmp_path / "allocation_quality.json"
    assert allocation_quality.main([
        "--model", str(stories_dir), "--nsamples", "4", "--seqlen", "64", "--val-windows", "2", "--eval-data",
        str(TEXT / "tinystories_valid_head.txt"), "--eval-seqlen", "128", "--eval-tokens", "1024",
        "--sparsities", "0.7", "--beta-step", "0.05", "--methods", "wanda", "--plans", "0.6", "--random-seeds", "0", "--label", "test",
        "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["rows"]) == {f"wanda/0.7/{a}" for a in ("uniform", "owl", "alphapruning", "atp")}
    for row in r["rows"].values():
        assert row["ppl"] > r["dense"] and row["mean_sparsity"] == pytest.approx(0.7, abs=1e-5)
    atp = r["rows"]["wanda/0.7/atp"]
    assert atp["trials"] == len(atp["search"]) >= 1 and atp["beta"] in [t["beta"] for t in atp["search"]]
    assert set(r["plans"]) == {"all", "0.6/error_depth", "0.6/first_dense", "0.6/random/0"}
    plan = r["plans"]["0.6/error_depth"]
    assert plan["fraction_24"] >= 0.6 and 1 < plan["predicted_speedup"] < r["plans"]["all"]["predicted_speedup"]
    for v in r["plans"].values():
        if v is not r["plans"]["all"]:
            # the naive rivals are filled up to the plan's predicted speedup, never past it
            assert 1 < v["predicted_speedup"] <= plan["predicted_speedup"] + 1e-9
    for suffix in (".png", "_rates.png", "_plans.png"):
        assert out.with_name(out.stem + suffix).read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    text = tables.allocation_quality()
    assert "**test**" in text and "| wanda | 70% |" in text and "0.6/error_depth" in text
    assert "- Wanda 70%: ATP" in text and "of weights 2:4: the plan (" in text and "naive plan" in text
