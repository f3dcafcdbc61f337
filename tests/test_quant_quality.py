"""benchmarks.quant_quality's run specs and the prunes they map to; bad specs are clear errors."""
import argparse
import json

import pytest

from benchmarks import quant_quality as bench
from benchmarks import tables


def _args(**kw):
    return argparse.Namespace(**{"device": "cpu", "ignore": ["lm_head"], "progress": False, "group_size": 64,
                                 "refit": 50, "rotate_steps": 100, "seqlen": 512, **kw})


def test_default_runs_cover_dense_and_2_4_in_every_precision_with_and_without_rotation():
    runs = [bench.parse_run(r) for r in bench.DEFAULT_RUNS]
    assert len(runs) == 15 and {"prune": "dense", "quant": "fp32", "rotation": "none"} in runs
    assert {(r["prune"], r["quant"]) for r in runs if r["rotation"] == "nm"} == {
        ("dense", "int8"), ("dense", "int4"), ("2:4", "fp32"), ("2:4", "int8"), ("2:4", "int4"), ("2:4", "int8-after"),
        ("2:4", "int4-after")}


def test_runs_map_to_gptq_for_dense_and_sparsegpt_with_the_best_rotation_for_2_4():
    assert bench.run_config(bench.parse_run("dense/fp32/none"), _args()) is None
    dense = bench.run_config(bench.parse_run("dense/int4/nm"), _args())
    assert dense.method == "gptq" and dense.refit == 0 and dense.quant.group_size == 64
    assert dense.rotate.importance == "sparsegpt" and dense.rotate.steps == 100 and dense.rotate.blocks == 1
    sparse = bench.run_config(bench.parse_run("2:4/int8/none"), _args())
    assert (sparse.method, sparse.refit, sparse.rotate, sparse.quant.group_size) == ("sparsegpt", 50, None, None)
    assert bench.run_config(bench.parse_run("2:4/fp32/nm"), _args()).quant is None


@pytest.mark.parametrize("spec,message", [("2:4/int4", "want PRUNE/QUANT/ROTATION"), ("4:8/int4/none", "want PRUNE"),
                                          ("2:4/int3/none", "want PRUNE"), ("2:4/int4/spin", "want PRUNE"),
                                          ("dense/fp32/nm", "function-preserving"),
                                          ("dense/int8-after/none", "dense rows are GPTQ"),
                                          ("2:4/fp32-after/none", "want PRUNE"),
                                          ("2:4/fp32-search/none", "want PRUNE"),
                                          ("2:4/int4-search-after/none", "want PRUNE"),
                                          ("2:4/int4-sink-after/none", "want PRUNE"),
                                          ("dense/fp32-sink/none", "prunes and quantizes nothing")])
def test_bad_run_specs_are_refused(spec, message):
    with pytest.raises(SystemExit, match=message):
        bench.parse_run(spec)


def test_an_after_run_quantizes_the_full_precision_prune_by_gptq():
    config = bench.run_config(bench.parse_run("2:4/int4-after/nm"), _args())
    assert config.quantize_after and config.quant.group_size == 64 and config.method == "sparsegpt"
    assert not bench.run_config(bench.parse_run("2:4/int4/nm"), _args()).quantize_after


def test_a_search_run_searches_its_scales_and_the_table_says_so():
    config = bench.run_config(bench.parse_run("2:4/int4-after-search/nm"), _args())
    assert config.quantize_after and config.scale_search and config.quant.group_size == 64
    assert not bench.run_config(bench.parse_run("2:4/int4-after/nm"), _args()).scale_search
    dense = bench.run_config(bench.parse_run("dense/int4-search/none"), _args())
    assert dense.method == "gptq" and dense.scale_search and not dense.quantize_after
    row = {"prune": "2:4", "rotation": "nm", "method": "sparsegpt", "seconds": 60, "threads": 2, "cpu": "c"}
    report = {"calibration": {"nsamples": 32, "seqlen": 512, "seed": 0}, "eval": {"seqlen": 512, "tokens": 40960},
              "model": "m", "group_size": 64, "refit": 50, "device": "cpu", "torch": "t", "date": "2026-12-07",
              "runs": {"2:4/fp32/nm": {**row, "quant": "fp32", "perplexity": 50.0},
                       "2:4/int4-after-search/nm": {**row, "quant": "int4-after-search", "perplexity": 54.0}}}
    table = tables.quant_quality.__wrapped__(report)
    assert "| 2:4/int4-after-search/nm | sparsegpt, then gptq, searched scales | 54.00 | +8.0% |" in table
    assert "within 10%: met" in table


def test_an_int4_group_that_does_not_fit_the_blocks_is_refused_before_any_model_loads():
    with pytest.raises(ValueError, match="blocksize 128 must be a multiple of the int4 group size 192"):
        bench.run_config(bench.parse_run("2:4/int4/none"), _args(group_size=192))


def test_add_refuses_a_missing_report_and_one_made_with_other_settings(tmp_path):
    report = {k: 0 for k in bench.SETTINGS} | {"eval": {"file": "w", "seqlen": 512, "tokens": 1, "bos": "none"}}
    out = tmp_path / "q.json"
    with pytest.raises(SystemExit, match="no report to add to"):
        bench.previous_runs(out, report)
    out.write_text(json.dumps(report | {"runs": {"2:4/fp32/none": {"perplexity": 9.0}}}))
    assert bench.previous_runs(out, report | {"eval": {"file": "w", "seqlen": 512}}) == {
        "2:4/fp32/none": {"perplexity": 9.0}}  # the evaluation's measured tokens and BOS are not settings
    with pytest.raises(SystemExit, match=r"other settings \(refit, eval\)"):
        bench.previous_runs(out, report | {"refit": 5, "eval": {"file": "w", "seqlen": 256}})


def test_a_sink_run_weighs_each_windows_first_token_by_the_window_length_against_its_own_fp32_row():
    config = bench.run_config(bench.parse_run("2:4/int4-after-search-sink/nm"), _args(seqlen=512))
    assert config.sink_weight == 512 and config.quantize_after and config.scale_search
    assert bench.run_config(bench.parse_run("2:4/fp32-sink/nm"), _args(seqlen=256)).sink_weight == 256
    assert bench.run_config(bench.parse_run("2:4/int4-after/nm"), _args(seqlen=512)).sink_weight == 1
    row = {"prune": "2:4", "rotation": "nm", "method": "sparsegpt", "seconds": 60, "threads": 2, "cpu": "c"}
    report = {"calibration": {"nsamples": 32, "seqlen": 512, "seed": 0}, "eval": {"seqlen": 512, "tokens": 40960},
              "model": "m", "group_size": 64, "refit": 50, "device": "cpu", "torch": "t", "date": "2026-12-07",
              "runs": {"2:4/fp32/nm": {**row, "quant": "fp32", "perplexity": 60.0},
                       "2:4/fp32-sink/nm": {**row, "quant": "fp32-sink", "perplexity": 50.0},
                       "2:4/int4-after-sink/nm": {**row, "quant": "int4-after-sink", "perplexity": 54.0}}}
    table = tables.quant_quality.__wrapped__(report)
    assert "| 2:4/int4-after-sink/nm | sparsegpt, then gptq, sink-weighted | 54.00 | +8.0% |" in table
    assert "| 2:4/fp32-sink/nm | sparsegpt, sink-weighted | 50.00 |  |" in table
