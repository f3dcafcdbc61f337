"""The README's result tables are exactly what benchmarks/tables.py renders from benchmarks/results/."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_the_results():
    tables = _tables()
    readme = (ROOT / "README.md").read_text()
    assert set(m.group(2) for m in tables.BLOCK.finditer(readme)) == set(tables.TABLES)
    assert tables.render(readme) == readme, "README tables are stale: run python benchmarks/tables.py --write"


def test_a_changed_number_is_caught(tmp_path, monkeypatch):
    tables = _tables()
    readme = tables.render((ROOT / "README.md").read_text())
    tampered = readme.replace("| sparsegpt | ", "| sparsegpt | 1.0 ", 1)
    assert tampered != readme and tables.render(tampered) != tampered


def test_latest_result_is_the_newest_by_recorded_date(tmp_path, monkeypatch):
    import json

    tables = _tables()
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    # File names sort the other way round from the dates (a GPU name, a re-run, a date in another zone).
    (tmp_path / "kernels-zz-old.json").write_text(json.dumps({"date": "2026-11-01T10:00:00+00:00", "id": "old"}))
    (tmp_path / "kernels-aa-new.json").write_text(json.dumps({"date": "2026-11-02T01:00:00+02:00", "id": "new"}))
    (tmp_path / "kernels-undated.json").write_text(json.dumps({"id": "undated"}))
    assert tables._latest("kernels-")["id"] == "new"
    assert tables._latest("prefill-") is None


def test_the_orderings_the_readme_states_hold_in_the_results():
    import json

    ppl = json.loads((ROOT / "benchmarks" / "results" / "prune_quality.json").read_text())["perplexity"]
    for pattern in ("2:4", "4:8", "unstructured"):
        assert ppl[f"sparsegpt/{pattern}"] < ppl[f"wanda/{pattern}"] < ppl[f"magnitude/{pattern}"] / 4
    for method in ("magnitude", "wanda", "sparsegpt"):
        assert ppl[f"{method}/unstructured"] < ppl[f"{method}/4:8"] < ppl[f"{method}/2:4"]
    assert ppl["dense"] < min(v for k, v in ppl.items() if k != "dense")


def test_gpu_tables_render_what_the_benchmarks_write(tmp_path, monkeypatch):
    # Rows made by benchmarks/kernels.py's own make_row, so a schema change there fails here, not on a GPU day.
    import json

    tables = _tables()
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    kb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kb)
    rows = [kb.make_row(p, (4096, 4096), "fp16", 1, ms, 0.02, 3000.0)
            for p, ms in (("dense", 0.02), ("triton", 0.0125), ("dispatch", 0.013))]
    meta = {"device": "GPU", "date": "2026-01-01T00:00:00", "torch": "t", "triton": "x", "copy_bandwidth_GBps": 3000.0}
    (tmp_path / "kernels-GPU-1.json").write_text(json.dumps({**meta, "rows": rows}))
    (tmp_path / "prefill-GPU-1.json").write_text(json.dumps({
        "device": "GPU", "date": "2026-01-01T000000Z", "dtype": "float16", "torch": "t",
        "rows": [{"shape": "q/o 4096x4096", "n": 4096, "k": 4096, "m": 2048, "dense_us": 100.0, "dense_host_us": 4.0,
                  "cusparselt_us": 62.5, "cusparselt_host_us": 9.0, "cusparselt_speedup": 1.6,
                  "cusparselt_call_host_us": 6.0}]}))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    assert "| 1 | 1.60x (" in tables.decode() and "auto 1.54x" in tables.decode()
    assert "| q/o 4096x4096 | 2048 | - | 1.60x (9 us) | - | 6.0 us |" in tables.prefill()


def test_the_table_reproduces_the_reference_code_within_half_a_percent():
    import json

    r = json.loads((ROOT / "benchmarks" / "results" / "prune_quality.json").read_text())
    assert r["calibration"]["sampling"] == "reference" and r["eval"]["max_tokens"] == 40960
    assert r["reference_code"], "no reference values recorded"
    for key, ref in r["reference_code"].items():
        assert abs(r["perplexity"][key] - ref) / ref < 0.005, key
