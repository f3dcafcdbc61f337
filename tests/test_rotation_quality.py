"""benchmarks.rotation_quality's run specs: what each field means, and a clear error for a bad one."""
import json

import pytest

from benchmarks import rotation_quality


@pytest.fixture(scope="module")
def bench():
    return rotation_quality


def test_run_specs_and_their_keys(bench):
    own, other = bench.parse_run("sparsegpt:nm:1:100"), bench.parse_run("sparsegpt:nm:1:100:wanda")
    assert own["importance"] == "sparsegpt" and other["importance"] == "wanda"
    assert bench.run_key(own) == "sparsegpt/nm/b1/100" and bench.run_key(other) == "sparsegpt/nm/b1/100/wanda"
    assert bench.run_key(bench.parse_run("wanda:none")) == "wanda/none"
    assert bench.parse_run("wanda:entropy:4")["steps"] == 100
    # a least-squares refit is another configuration: its key says so, with or without rotation
    assert bench.run_key({**own, "refit": 50}) == "sparsegpt/nm/b1/100/refit50"
    assert bench.run_key({**bench.parse_run("sparsegpt:none"), "refit": 50}) == "sparsegpt/none/refit50"


@pytest.mark.parametrize("spec,message", [("sparsegpt", "want method:objective"), ("obs:nm", "want method"),
                                          ("wanda:variance", "want method"),
                                          ("sparsegpt:nm:1:100:obs", "unknown importance 'obs'")])
def test_bad_run_specs_are_refused(bench, spec, message):
    with pytest.raises(SystemExit, match=message):
        bench.parse_run(spec)


def test_flop_count_follows_the_importance_and_the_blocks(bench):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    count = {m: bench.gflop_per_step(config, 1, m) for m in ("magnitude", "wanda", "sparsegpt")}
    assert count["magnitude"] < count["wanda"] < count["sparsegpt"]  # diagonals, then whole products + Cholesky
    assert bench.gflop_per_step(config, 4, "wanda") < count["wanda"]


def _report(date, runs):
    return {"model": "m", "pattern": "2:4", "date": date, "calibration": {"nsamples": 32}, "eval": {"seqlen": 512},
            "perplexity": {"dense": 29.5, **{k: r["perplexity"] for k, r in runs.items()}}, "runs": runs,
            "decode": {}}


def test_merge_keeps_a_rerun_on_other_threads_and_replaces_one_on_the_same(bench, tmp_path):
    key = "sparsegpt/nm/b1/100"
    a = _report("d1", {key: {"perplexity": 58.0, "threads": 1}, "wanda/none": {"perplexity": 210.0, "threads": 1}})
    b = _report("d2", {key: {"perplexity": 59.0, "threads": 2}, "wanda/none": {"perplexity": 211.0, "threads": 1}})
    out = tmp_path / "merged.json"
    bench.merge_reports([a, b], out)
    merged = json.loads(out.read_text())
    assert merged["perplexity"] == {"dense": 29.5, key: 58.0, f"{key}@2t": 59.0, "wanda/none": 211.0}
    assert merged["runs"][f"{key}@2t"]["threads"] == 2 and merged["merged_from"] == ["d1", "d2"]


def test_merge_keeps_a_rerun_learned_in_fp32_as_another_sample(bench, tmp_path):
    key = "sparsegpt/nm/b1/100"
    bf16 = {"objective": "nm", "perplexity": 59.0, "threads": 2}  # recorded before the dtype field: bf16
    fp32 = {**bf16, "perplexity": 57.0, "rotation_dtype": "float32"}
    out = tmp_path / "merged.json"
    bench.merge_reports([_report("d1", {key: bf16}), _report("d2", {key: fp32})], out)
    assert json.loads(out.read_text())["perplexity"] == {"dense": 29.5, key: 59.0, f"{key}/float32": 57.0}
    bench.merge_reports([_report("d1", {key: bf16}), _report("d2", {key: {**bf16, "rotation_dtype": "bfloat16"}})],
                        out)  # the same rounding: a rerun replaces it
    assert list(json.loads(out.read_text())["runs"]) == [key]


def test_merge_refuses_reports_of_another_protocol(bench, tmp_path):
    a = _report("d1", {})
    b = {**_report("d2", {}), "eval": {"seqlen": 2048}}
    with pytest.raises(SystemExit, match="differ"):
        bench.merge_reports([a, b], tmp_path / "merged.json")
