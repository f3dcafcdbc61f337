import json

import pytest
import torch
from transformers import AutoTokenizer

from sparse_runtime.prune import CalibrationError, calibration_windows
from sparse_runtime.prune.calibration import read_texts

from conftest import TEXT


@pytest.fixture(scope="module")
def tok(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


def test_windows_fixed_seed_shape_and_text_or_jsonl(tok, tmp_path):
    a = calibration_windows(tok, TEXT / "c4_validation_2k.jsonl", nsamples=4, seqlen=64, seed=0)
    b = calibration_windows(tok, TEXT / "c4_validation_2k.jsonl", nsamples=4, seqlen=64, seed=0)
    c = calibration_windows(tok, TEXT / "c4_validation_2k.jsonl", nsamples=4, seqlen=64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    t = calibration_windows(tok, TEXT / "tinystories_valid_head.txt", nsamples=3, seqlen=32)
    assert t.shape == (3, 32)


def test_seqlen_clipped_to_context(tok):
    with pytest.warns(UserWarning, match="clipped to the model's context 16"):
        ids = calibration_windows(tok, TEXT / "tinystories_valid_head.txt", nsamples=2, seqlen=64, max_seqlen=16)
    assert ids.shape == (2, 16)


def test_too_short_file_errors_or_reduces(tok, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    with pytest.raises(CalibrationError, match="fewer than one calibration window of 512"):
        calibration_windows(tok, short, nsamples=4, seqlen=512)
    with pytest.warns(UserWarning, match="using 1 instead of 4"):
        ids = calibration_windows(tok, short, nsamples=4, seqlen=8)
    assert ids.shape == (1, 8)


def test_jsonl_needs_text_field_and_file_must_exist(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: expected a JSON object with a 'text' field"):
        read_texts(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_texts(tmp_path / "missing.txt")
