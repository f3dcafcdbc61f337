"""tests/pytest_jsonl.py: one JSON line per test as it finishes, as a plugin and through tests/conftest.py; and the
GPU check's time limits."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_each_finished_test_is_logged_at_once(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert False\n"
        "@pytest.mark.skip(reason='no')\n"
        "def test_skipped(): pass\n")
    log = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "SPARSE_RUNTIME_TEST_LOG": str(log)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_jsonl",
                    str(tmp_path / "test_x.py")], env=env, cwd=tmp_path, capture_output=True, timeout=120)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    outcomes = {r["test"].split("::")[-1]: (r["outcome"], r["phase"]) for r in lines if "test" in r}
    assert outcomes == {"test_ok": ("passed", "call"), "test_bad": ("failed", "call"),
                        "test_skipped": ("skipped", "setup")}
    assert [r["start"].split("::")[-1] for r in lines if "start" in r] == ["test_ok", "test_bad", "test_skipped"]


def test_the_suite_logs_without_a_plugin_option(tmp_path):
    # the GPU check passes no -p: tests/conftest.py installs the hooks
    log = tmp_path / "out.jsonl"
    env = {**os.environ, "SPARSE_RUNTIME_TEST_LOG": str(log)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_pytest_jsonl.py::test_gpu_check_calls_fit_ten_minutes"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["test"].split("::")[-1], x["outcome"]) for x in lines if "test" in x] == [
        ("test_gpu_check_calls_fit_ten_minutes", "passed")]


def test_gpu_check_calls_fit_ten_minutes():
    # The one-command check runs its steps (install and builds included) under time limits that add up to at most
    # 480 s of the device tool's ten minutes (tests/test_gpu_check.py runs its dry run).
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    steps = re.search(r'STEPS=\$\{GPU_CHECK_STEPS:-"([^"]+)"\}', script).group(1)
    assert sum(int(step.split(":")[1]) for step in steps.split()) <= 480
