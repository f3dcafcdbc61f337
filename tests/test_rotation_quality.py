"""benchmarks/rotation_quality.py's run specs: what each field means, and a clear error for a bad one."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_rotation_quality", BENCH / "rotation_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_specs_and_their_keys(bench):
    own, other = bench.parse_run("sparsegpt:nm:1:100"), bench.parse_run("sparsegpt:nm:1:100:wanda")
    assert own["importance"] == "sparsegpt" and other["importance"] == "wanda"
    assert bench.run_key(own) == "sparsegpt/nm/b1/100" and bench.run_key(other) == "sparsegpt/nm/b1/100/wanda"
    assert bench.run_key(bench.parse_run("wanda:none")) == "wanda/none"
    assert bench.parse_run("wanda:entropy:4")["steps"] == 100


@pytest.mark.parametrize("spec,message", [("sparsegpt", "want method:objective"), ("obs:nm", "want method"),
                                          ("wanda:variance", "want method"),
                                          ("sparsegpt:nm:1:100:obs", "unknown importance 'obs'")])
def test_bad_run_specs_are_refused(bench, spec, message):
    with pytest.raises(SystemExit, match=message):
        bench.parse_run(spec)
