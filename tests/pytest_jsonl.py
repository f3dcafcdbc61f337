"""A pytest plugin that appends one JSON line per test to ``$SPARSE_RUNTIME_TEST_LOG`` as soon as the test
finishes, so a GPU check cut off by its time limit still shows what passed, failed and was running.

    SPARSE_RUNTIME_TEST_LOG=out.jsonl python -m pytest tests -m gpu

``tests/conftest.py`` installs its hooks for the test suite; elsewhere it loads as ``-p pytest_jsonl`` with this
folder importable. Without ``$SPARSE_RUNTIME_TEST_LOG`` it writes nothing.

Lines: ``{"test", "outcome", "phase", "seconds"}`` for the call of each test, and for a setup or teardown that
did not pass (a skip or an error); ``{"start": test}`` before each test runs.
"""
from __future__ import annotations

import json
import os


def _write(record: dict) -> None:
    path = os.environ.get("SPARSE_RUNTIME_TEST_LOG")
    if path:
        with open(path, "a") as f:  # one write per line, flushed at close: a killed run keeps what it wrote
            f.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _write({"start": nodeid})


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _write({"test": report.nodeid, "outcome": report.outcome, "phase": report.when,
                "seconds": round(report.duration, 3)})
