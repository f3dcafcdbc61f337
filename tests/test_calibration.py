import json

import pytest
import torch
from transformers import AutoTokenizer

from sparse_runtime.prune import CalibrationError, calibration_windows
from sparse_runtime.data.calibration import read_texts, validation_windows

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
    assert t.shape == (3, 32) and (t[:, 0] == tok.bos_token_id).all()
    docs = [tok(x, add_special_tokens=False).input_ids for x in read_texts(TEXT / "tinystories_valid_head.txt")]
    for row in t[:, 1:].tolist():  # the content: BOS, then 31 consecutive tokens of one story of the text file
        assert any(any(d[j:j + 31] == row for j in range(len(d) - 30)) for d in docs if len(d) > 31)


def test_seqlen_clipped_to_context(tok):
    with pytest.warns(UserWarning, match="clipped to the model's context 16"):
        ids = calibration_windows(tok, TEXT / "tinystories_valid_head.txt", nsamples=2, seqlen=64, max_seqlen=16)
    assert ids.shape == (2, 16)


def test_too_short_file_errors_or_reduces(tok, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")  # 10 tokens
    with pytest.raises(CalibrationError, match="fewer than one calibration window of 511"):
        calibration_windows(tok, short, nsamples=4, seqlen=512, sampling="concat")
    with pytest.warns(UserWarning, match="using 1 instead of 4"):
        ids = calibration_windows(tok, short, nsamples=4, seqlen=8, sampling="concat")
    assert ids.shape == (1, 8)
    with pytest.raises(CalibrationError, match="every document has fewer than one calibration window of 511"):
        calibration_windows(tok, short, nsamples=4, seqlen=512)
    assert calibration_windows(tok, short, nsamples=4, seqlen=8).shape == (4, 8)  # random slices of the one text
    with pytest.raises(ValueError, match="sampling must be one of"):
        calibration_windows(tok, short, sampling="shuffle")


def _reference_c4_loader(tokenizer, texts, nsamples, seqlen, seed):
    """The reference Wanda/SparseGPT get_c4 loop, global random state and all."""
    import random

    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(texts) - 1)
            enc = tokenizer(texts[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        out.append(enc.input_ids[:, i:i + seqlen])
    return torch.cat(out)


@pytest.mark.parametrize("seed", [0, 3])
def test_reference_sampling_is_the_reference_loader_window_for_window(tok, seed):
    path = TEXT / "c4_validation_2k.jsonl"
    ref = _reference_c4_loader(tok, read_texts(path), 8, 128, seed)
    assert torch.equal(calibration_windows(tok, path, 8, 128, seed=seed, bos="document"), ref)


def test_bos_leads_every_window_and_the_rest_is_one_document(tok):
    path = TEXT / "c4_validation_2k.jsonl"
    texts = [tok(t, add_special_tokens=False).input_ids for t in read_texts(path)]
    for sampling in ("reference", "concat"):
        w = calibration_windows(tok, path, 6, 64, seed=1, sampling=sampling)  # bos="auto": stories adds a BOS
        assert (w[:, 0] == tok.bos_token_id).all() and not (w[:, 1:] == tok.bos_token_id).any()
    body = calibration_windows(tok, path, 6, 64, seed=1)[:, 1:].tolist()
    for row in body:  # reference sampling: a contiguous slice of one document
        assert any(any(doc[j:j + 63] == row for j in range(len(doc) - 62)) for doc in texts if len(doc) > 63)


def test_jsonl_needs_text_field_and_file_must_exist(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: expected a JSON object with a 'text' field"):
        read_texts(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_texts(tmp_path / "missing.txt")


C4 = TEXT / "c4_validation_2k.jsonl"


def test_validation_windows_avoid_the_calibration_documents(tok):
    used = set()
    calib = calibration_windows(tok, C4, nsamples=4, seqlen=64, seed=0, used=used)
    val = validation_windows(tok, C4, 4, 64, exclude=used)
    texts = [line for line in C4.read_text().splitlines() if line.strip()]
    assert 1 <= len(used) <= 4
    first_free = min(set(range(len(texts))) - used)
    ids = tok(json.loads(texts[first_free])["text"], add_special_tokens=False)["input_ids"]
    assert val.shape == (4, 64) and val[0, 0] == tok.bos_token_id
    assert val[0, 1:20].tolist() == ids[:19]  # the validation text starts at the first unused document
    for w in calib:  # no calibration window's text appears in the validation windows
        assert w[1:17].tolist() not in [v[i:i + 16].tolist() for v in val for i in range(1, 48)]


def test_concat_sampling_reports_its_documents_too(tok):
    used = set()
    a = calibration_windows(tok, C4, nsamples=2, seqlen=64, seed=0, sampling="concat", used=used)
    assert torch.equal(a, calibration_windows(tok, C4, nsamples=2, seqlen=64, seed=0, sampling="concat"))
    assert 1 <= len(used) <= 2
    val = validation_windows(tok, C4, 2, 64, exclude=used)
    assert not any(torch.equal(w, v) for w in a for v in val)
