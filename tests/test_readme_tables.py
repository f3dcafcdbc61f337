"""The result tables of the README and docs/ are exactly what benchmarks.tables renders from benchmarks/results/,
and every table it knows appears on exactly one page."""
import json

from benchmarks import kernels, tables


def test_every_page_matches_the_results():
    assert tables.stale() == [], "tables are stale: run python -m benchmarks.tables"


def test_every_table_is_on_exactly_one_page():
    names = [m.group(2) for page in tables.pages() for m in tables.BLOCK.finditer(page.read_text())]
    assert sorted(names) == sorted(tables.TABLES)


def test_a_changed_number_is_caught(tmp_path, monkeypatch):
    page = tmp_path / "results.md"
    text = tables.render("<!-- table:prune_quality -->\n<!-- /table -->\n")
    page.write_text(text.replace("| sparsegpt | ", "| sparsegpt | 1.0 ", 1))
    monkeypatch.setattr(tables, "pages", lambda: [page])
    assert tables.stale() == [page] and tables.main(["--check"]) == 1
    assert tables.main([]) == 0 and page.read_text() == text and tables.stale() == []


def test_latest_result_is_the_newest_by_recorded_date(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    # File names sort the other way round from the dates (a GPU name, a re-run, a date in another zone).
    (tmp_path / "kernels-zz-old.json").write_text(json.dumps({"date": "2026-11-01T10:00:00+00:00", "id": "old"}))
    (tmp_path / "kernels-aa-new.json").write_text(json.dumps({"date": "2026-11-02T01:00:00+02:00", "id": "new"}))
    (tmp_path / "kernels-undated.json").write_text(json.dumps({"id": "undated"}))
    assert tables._latest("kernels-")["id"] == "new"
    assert tables._latest("prefill-") is None


def test_gpu_tables_render_what_the_benchmarks_write(tmp_path, monkeypatch):
    # Rows made by benchmarks.kernels' own make_row, so a schema change there fails here, not on a GPU day.
    rows = [kernels.make_row(p, (4096, 4096), "fp16", 1, ms, 0.02, 3000.0)
            for p, ms in (("dense", 0.02), ("triton", 0.0125), ("dispatch", 0.013))]
    meta = {"device": "GPU", "date": "2026-01-01T00:00:00", "torch": "t", "triton": "x", "copy_bandwidth_GBps": 3000.0}
    (tmp_path / "kernels-GPU-1.json").write_text(json.dumps({**meta, "rows": rows}))
    (tmp_path / "prefill-GPU-1.json").write_text(json.dumps({
        "device": "GPU", "date": "2026-01-01T00:00:00+00:00", "dtype": "float16", "torch": "t",
        "rows": [{"shape": "q/o 4096x4096", "n": 4096, "k": 4096, "m": 2048, "dense_us": 100.0, "dense_host_us": 4.0,
                  "cusparselt_us": 62.5, "cusparselt_host_us": 9.0, "cusparselt_speedup": 1.6,
                  "cusparselt_call_host_us": 6.0}]}))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    assert "| 1 | 1.60x (12.5 us, floor 6.3 us)" in tables.decode() and "auto 1.54x" in tables.decode()
    assert "| q/o 4096x4096 | 2048 | - | 1.60x (9 us) | - | 6.0 us |" in tables.prefill()


def test_recovery_table_renders_gradual_and_labelled_rows():
    # A gradual row starts dense (before: None) and carries its one-shot comparison; a labelled row its own lr and
    # windows.
    point = {"wikitext2": 70.0, "tinystories": 26.0}
    row = {"start": "wanda", "loss": "kd", "lr": 1e-4, "seqlen": 256, "batch": 4, "tokens": 1024, "seconds": 60.0,
           "tokens_per_s": 17, "before": {"wikitext2": 200.0, "tinystories": 60.0}, "after": point,
           "target_met": True}
    gradual = {**row, "before": None, "schedule": {"steps": 4}, "after": {"wikitext2": 75.0, "tinystories": 27.0},
               "oneshot_kd": {"after": point, "seconds": 60.0}}
    report = {"model": "m", "device": "cpu", "torch": "t", "date": "2026-12-07T00:00:00+00:00",
              "calibration": {"nsamples": 32, "seqlen": 512, "seed": 0}, "eval": {"seqlen": 512, "tokens": 40960},
              "training": {"file": "c4", "documents": "d"},
              "perplexity": {"dense": {"wikitext2": 29.52, "tinystories": 12.18}},
              "targets": {"wanda": {"ppl": 80.0, "seconds": 900}, "rotated-int4": {"of": "wanda", "within": 0.1}},
              "rows": {"wanda/kd": row, "wanda/kd (lr 5e-5)": {**row, "lr": 5e-5, "seqlen": 512, "batch": 2},
                       "wanda/gradual": gradual,
                       "rotated-int4/kd": {**row, "start": "rotated-int4", "embeddings": True, "checkpointing": False,
                                           "reference": {"row": "wanda/kd", "wikitext2": 70.0}, "target_met": False}}}
    text = tables.recovery.__wrapped__(report)  # the renderer itself, on this report
    assert "| rotated-int4/kd | kd (+ embeddings), no checkpointing |" in text
    assert "| within 10% of wanda/kd (70.00): missed |" in text
    assert "| wanda/kd (lr 5e-5) | kd | 5e-05 | 2 x 512 |" in text
    assert "| wanda/gradual | kd, gradual (4 prunes) | 0.0001 | 4 x 256 | 1,024 | 1.0 min | 17 | dense 29.52 -> **75.00** |" in text
    assert "WikiText-2 75.00 vs 70.00" in text
