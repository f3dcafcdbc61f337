"""Calibration data: fixed-seed windows of token ids from any text or jsonl file (default: C4 validation)."""
from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path

import torch

from ..errors import SparseRuntimeError

_SHARED = Path(os.environ.get("SPARSE_RUNTIME_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data" / "text"
DEFAULT_CALIB = _SHARED / "c4_validation_2k.jsonl"
DEFAULT_EVAL = _SHARED / "wikitext2_raw_test.txt"


class CalibrationError(SparseRuntimeError, ValueError):
    """The calibration text cannot give the requested windows."""


def read_texts(path) -> list[str]:
    """A ``.jsonl`` file -> the ``text`` field of each line; anything else -> its whole text as one document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration/eval text {path} not found")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CalibrationError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
        return texts
    return [path.read_text(encoding="utf-8")]


def context_length(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def calibration_windows(tokenizer, path=DEFAULT_CALIB, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                        max_seqlen: int | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids: documents shuffled with ``seed``, joined with EOS, cut into windows.

    ``seqlen`` is clipped to ``max_seqlen`` (the model's context). Fewer tokens
    than one window is an error; fewer than ``nsamples`` windows warns and
    returns as many as there are."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if max_seqlen and seqlen > max_seqlen:
        warnings.warn(f"calibration seqlen {seqlen} clipped to the model's context {max_seqlen}", stacklevel=2)
        seqlen = max_seqlen
    texts = read_texts(path)
    random.Random(seed).shuffle(texts)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    need, ids = nsamples * seqlen, []
    for text in texts:  # tokenize only as many documents as the windows need
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
        if len(ids) >= need:
            break
    have = len(ids) // seqlen
    if have == 0:
        raise CalibrationError(f"{path} has {len(ids)} tokens, fewer than one calibration window of {seqlen}; "
                               "give a longer file or a smaller --seqlen")
    if have < nsamples:
        warnings.warn(f"{path} gives only {have} windows of {seqlen} tokens; using {have} instead of "
                      f"{nsamples} calibration samples", stacklevel=2)
    return torch.tensor(ids[: min(have, nsamples) * seqlen], dtype=torch.long).view(-1, seqlen)
