"""benchmarks/engine.py and benchmarks/serve_load.py end to end on stories260K (tiny settings): the reports
they write hold what the README tables read, and the numbers are the ones the runs imply."""
import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_engine_benchmark_report(stories_dir, tmp_path):
    out = tmp_path / "engine.json"
    assert _script("engine").main(["--model", str(stories_dir), "--batches", "1", "4", "--tokens", "5", "--repeats", "1",
                                   "--prompt-tokens", "32", "--prefill-batch", "2", "--no-compile", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["variants"]) == {"dense", "2:4"} and out.with_suffix(".png").exists()
    for name, v in r["variants"].items():
        d = v["decode_tokens_per_s"]
        # a rate is a difference of two timings: on a loaded machine a tiny run's can come out negative, so only
        # the report's shape and its arithmetic are checked here
        assert set(d) == {"hf_generate_b1", "engine_b1", "engine_b4"} and all(map(math.isfinite, d.values()))
        assert v["engine_b1_vs_hf"] == d["engine_b1"] / d["hf_generate_b1"]
        assert v["peak_memory_bytes"] >= v["baseline_memory_bytes"] + v["model_bytes"] // 2
        assert 0 < v["ttft_s"] < 60 and v["prefill_tokens_per_s"] > 0
        # the read-bandwidth bound is for the dense variant only (a 2:4 layer's bytes read depend on its backend)
        assert (v.get("read_bytes_per_s", 0) > 0) == (name == "dense")
        if name == "dense":
            assert v["b1_bound_tokens_per_s"] == v["read_bytes_per_s"] / v["model_bytes"]
            assert v["engine_b1_bytes_per_s"] == v["model_bytes"] * d["engine_b1"]
    # the 2:4 variant stores half the values plus metadata (the reference of the decompressed backend aside)
    assert r["variants"]["2:4"]["model_bytes"] != r["variants"]["dense"]["model_bytes"]


def test_serve_load_benchmark_report(stories_dir, tmp_path):
    out = tmp_path / "serve_load.json"
    assert _script("serve_load").main(["--model", str(stories_dir), "--requests", "12", "--clients", "4",
                                       "--max-tokens", "4", "--overload-extra", "4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    lo, ov = r["load"], r["overload"]
    assert lo["failed"] == 0 and lo["requests"] == 12 and lo["generated_tokens_per_s"] > 0
    assert lo["latency_s"]["p50"] <= lo["latency_s"]["p99"] and lo["ttft_s"]["p50"] <= lo["latency_s"]["p99"]
    # a tiny model can finish an admitted request while the extras arrive: those are admitted and must succeed
    assert ov["admitted_ok"] == 3 and ov["rejected_503"] >= 1 and ov["rejected_503"] == ov["rejected_with_retry_after"]
    assert ov["rejected_503"] + ov["other_ok"] == 4
