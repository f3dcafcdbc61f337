import os
from pathlib import Path

import pytest
import torch
from pytest_jsonl import pytest_runtest_logreport, pytest_runtest_logstart  # noqa: F401  (hooks: one JSON line per test)

# Without a GPU, Triton kernels run under the interpreter. It must be set before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():  # a clean clone sits beside shared/; also allow an override
    SHARED = Path(os.environ.get("SPARSE_RUNTIME_SHARED", SHARED))
STORIES = SHARED / "data" / "models" / "stories260K"
TEXT = SHARED / "data" / "text"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: loads SmolLM2-135M or runs longer than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stories_dir():
    if not STORIES.exists():
        pytest.fail(f"stories260K not found at {STORIES}; set SPARSE_RUNTIME_SHARED to the shared/ folder")
    return STORIES


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is as fast, and far faster on a busy shared CPU (two OpenMP threads on two
    shared cores spend most of their time in barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
