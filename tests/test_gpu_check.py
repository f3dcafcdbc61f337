"""benchmarks/gpu_check.sh without a GPU: its whole control flow in a dry run against a stub .gpu/ (every step's
command replaced by a stub that writes what the step writes), its checks (step limits within the budget, what
comes back from $OUT, the carried wheels cover every third-party import), and the engine benchmark's warm-up."""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import engine
from sparse_runtime import SparseLinear

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
DEFAULT_STEPS = re.search(r'STEPS=\$\{GPU_CHECK_STEPS:-"([^"]+)"\}', SCRIPT.read_text()).group(1)


def gpu_check(*args, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    return subprocess.run(["bash", str(SCRIPT), *args], env={**base, "PYTHON": sys.executable, **env},
                          capture_output=True, text=True, timeout=60, check=False)


def wheels() -> list[str]:
    out = gpu_check("wheels")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.fixture
def stub(tmp_path):
    """A stub of what `gpu_check.sh prep` carries: an empty file per pinned wheel, the test data's folder."""
    carry = tmp_path / "gpu"
    (carry / "whl").mkdir(parents=True)
    (carry / "shared" / "data" / "models" / "stories260K").mkdir(parents=True)
    for pin in wheels():
        name, version = pin.split("==")
        (carry / "whl" / f"{re.sub(r'[-.]', '_', name)}-{version}-py3-none-any.whl").touch()
    return {"GPU_CHECK_DIR": str(carry), "GPU_CHECK_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out")}


def steps_table(out: Path) -> dict[str, str]:
    text = (out / "gpu_check.txt").read_text()
    return dict(re.findall(r"^(\w+)\s+\d+\s+\d+\s+(.+)$", text, re.M))


def test_dry_run_of_the_one_command(stub):
    res = gpu_check("--dry-run", **stub)
    assert res.returncode == 0, res.stdout + res.stderr
    out = Path(stub["OUT"])
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and all(p.is_file() for p in out.iterdir())  # what the device tool brings back
    assert names == ["engine_llama3_8b.json", "gpu_check.txt", "kernels-DRY_RUN-20260101T000000.json",
                     "logs.tar.gz", "prefill-DRY_RUN-20260101T000000.json"]
    table = steps_table(out)
    assert list(table) == [s.split(":")[0] for s in DEFAULT_STEPS.split()] and set(table.values()) == {"ok"}
    assert "junit_gpu.xml: 1 passed, 0 failed" in (out / "gpu_check.txt").read_text()
    with tarfile.open(out / "logs.tar.gz") as tar:
        held = set(tar.getnames())
    assert {"logs/setup.log", "logs/tests.log", "logs/junit_gpu.xml", "logs/junit_gpu_serial.xml",
            "logs/test_gpu.jsonl", "logs/engine.log", "results/engine_llama3_8b.png"} <= held
    assert "sum 480 s <= 480 s" in res.stdout or re.search(r"sum (\d+) s <= 480 s", res.stdout)
    assert "carried wheels: " in res.stdout


def test_a_failed_or_stopped_step_does_not_stop_the_next(stub):
    """A step that fails, and one that outlives its limit (SIGINT, then SIGKILL), are reported; the steps after
    them run and their results still come back."""
    res = gpu_check("--dry-run", **stub, GPU_CHECK_DRY_HANG="tests", GPU_CHECK_DRY_FAIL="decode", GPU_CHECK_GRACE="1",
                    GPU_CHECK_STEPS="setup:3 tests:3 decode:3 prefill:3 engine:3")
    assert res.returncode == 1
    table = steps_table(Path(stub["OUT"]))
    assert table["tests"].startswith("stopped at its time limit") and table["decode"] == "failed (rc 3)"
    assert table["setup"] == table["prefill"] == table["engine"] == "ok"
    assert (Path(stub["OUT"]) / "engine_llama3_8b.json").exists()


def test_named_steps_run_after_setup_alone(stub):
    """`gpu_check.sh STEP ...`: setup, then the steps named, those the default leaves out too."""
    res = gpu_check("--dry-run", "decode", "rotation", **stub)
    assert res.returncode == 0, res.stdout + res.stderr
    assert list(steps_table(Path(stub["OUT"]))) == ["setup", "decode", "rotation"]
    assert sorted(p.name for p in Path(stub["OUT"]).iterdir()) == [
        "gpu_check.txt", "kernels-DRY_RUN-20260101T000000.json", "logs.tar.gz", "rotation.json"]


def test_step_limits_over_the_budget_are_refused(stub):
    res = gpu_check("--dry-run", **stub, GPU_CHECK_STEPS="setup:100 tests:381")
    assert res.returncode == 2 and "481 s, over the budget of 480 s" in res.stderr
    assert not Path(stub["OUT"]).exists()  # refused before anything ran


def test_default_limits_fit_the_budget_and_the_docs_state_them():
    limits = {name: int(s) for name, s in (step.split(":") for step in DEFAULT_STEPS.split())}
    assert sum(limits.values()) <= 480
    doc = (ROOT / "docs" / "gpu_check.md").read_text()
    for name, limit in limits.items():
        assert re.search(rf"^\| `?{name}`? \| {limit} s? ?\|", doc, re.M), f"docs/gpu_check.md: no row for {name}"
    assert f"{sum(limits.values())} s" in doc


def test_a_stub_carry_without_a_wheel_fails_setup(stub):
    victim = next(Path(stub["GPU_CHECK_DIR"], "whl").glob("openai-*.whl"))
    victim.unlink()
    res = gpu_check("--dry-run", **stub)
    assert res.returncode == 1 and steps_table(Path(stub["OUT"]))["setup"] == "failed (rc 1)"
    with tarfile.open(Path(stub["OUT"]) / "logs.tar.gz") as tar:
        log = tar.extractfile("logs/setup.log").read().decode()
    assert "has no wheel of openai==" in log


def test_carried_wheels_cover_every_third_party_import():
    """Statically, from this environment's package metadata: every import of tests/, benchmarks/ and
    sparse_runtime/ is in the GPU image or carried, and so is every requirement of a carried wheel, in a version
    it accepts (markers for the image's Python 3.12)."""
    pins = wheels()
    assert len(pins) == len({p.split("==")[0] for p in pins}) and all("==" in p for p in pins)
    res = gpu_check("check-wheels")
    assert res.returncode == 0, res.stderr
    without = [p for p in pins if not p.startswith("pydantic==")]  # openai needs it
    res = gpu_check("check-wheels", *without)
    assert res.returncode == 1 and "pydantic (required by openai): neither carried nor in the GPU image" in res.stderr
    wrong = [p.replace("pydantic-core==", "pydantic-core==0.") for p in pins]
    res = gpu_check("check-wheels", *wrong)
    assert res.returncode == 1 and "pydantic requires pydantic-core==" in res.stderr


def test_engine_benchmark_warms_every_sparse_layer_up_per_bucket():
    """Before the engine captures its decode graphs, every SparseLinear runs eagerly at each M specialisation of the
    row counts' buckets (so Triton compiles, cuSPARSELt searches and the dispatcher measures outside a capture)."""
    model = nn.Sequential(SparseLinear(64, 32, dtype=torch.float32), nn.ReLU(), SparseLinear(32, 16, dtype=torch.float32))
    seen = []
    for layer in (model[0], model[2]):
        layer.register_forward_pre_hook(lambda mod, args: seen.append((mod.in_features, args[0].shape[0])))
    engine.warm_up(model, {1, 8})
    rows = [1, 5, 8]  # bucket 1; bucket 8's smallest (5) and largest (8) specialisations
    assert sorted(seen) == sorted((k, m) for k in (64, 32) for m in rows)
