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
    """The model's context in tokens, or None where its config does not say (the one place that reads it)."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


BOS_MODES = ("auto", "window", "document")
SAMPLINGS = ("reference", "concat")
BOS_LABELS = {"window": "BOS per window", "document": "BOS per document (reference protocol)",
              "none": "no BOS (the tokenizer adds none)"}


def added_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts in front of a text by default (Llama, Gemma), or None where it adds
    none (SmolLM2 and GPT-2 style tokenizers, even when they name a ``bos_token``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos if bos is not None and ids[:1] == [bos] else None


def bos_mode(tokenizer, bos: str = "auto") -> str:
    """Resolve ``bos`` to what the windows get: ``"window"`` (every window starts with BOS), ``"document"``
    (the tokenizer's own special tokens on each text, so BOS leads only a document's first window, as the
    reference Wanda/SparseGPT code evaluates and calibrates) or ``"none"`` (the tokenizer adds no BOS: both
    are the same). ``"auto"`` is ``"window"``: a model trained with BOS at the start of every sequence
    (Gemma) is far worse without it."""
    if bos not in BOS_MODES:
        raise ValueError(f"bos must be one of {', '.join(BOS_MODES)}, got {bos!r}")
    if added_bos(tokenizer) is None:
        return "none"
    return "document" if bos == "document" else "window"


def encode(tokenizer, text: str, mode: str) -> list[int]:
    """Token ids of one text: with the tokenizer's special tokens in ``"document"``/``"none"`` mode (as the
    reference code tokenizes), without them in ``"window"`` mode (the caller puts BOS in front of each window)."""
    return tokenizer(text, add_special_tokens=mode != "window")["input_ids"]


def calibration_windows(tokenizer, path=DEFAULT_CALIB, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                        max_seqlen: int | None = None, sampling: str = "reference",
                        bos: str = "auto", used: set[int] | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids from the documents of ``path``, with a fixed ``seed``.

    ``sampling="reference"`` draws as the reference Wanda/SparseGPT C4 loader does, window for window
    (``random.seed(seed)``; per sample a random document longer than the window, then a random slice of it);
    ``"concat"`` shuffles the documents, joins them with EOS and cuts consecutive windows across document
    boundaries. ``bos`` is resolved by :func:`bos_mode`: in ``"window"`` mode each window is BOS followed by
    ``seqlen - 1`` text tokens. ``seqlen`` is clipped to ``max_seqlen`` (the model's context). Too little text
    for one window is an error; concat sampling with fewer than ``nsamples`` windows warns and returns as many
    as there are. ``used``, a set, receives the indices of the documents the windows were cut from (so a
    validation text can avoid them: :func:`validation_windows`)."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if max_seqlen and seqlen > max_seqlen:
        warnings.warn(f"calibration seqlen {seqlen} clipped to the model's context {max_seqlen}", stacklevel=2)
        seqlen = max_seqlen
    mode = bos_mode(tokenizer, bos)
    lead = [tokenizer.bos_token_id] if mode == "window" else []
    span = seqlen - len(lead)  # text tokens per window
    texts = read_texts(path)
    draw = _reference_windows if sampling == "reference" else _concat_windows
    used = set() if used is None else used
    windows = draw(tokenizer, texts, mode, nsamples, span, random.Random(seed), path, used)
    return torch.tensor([lead + w for w in windows], dtype=torch.long).view(-1, seqlen)


def validation_windows(tokenizer, path=DEFAULT_CALIB, nwindows: int = 16, seqlen: int = 512,
                       exclude: set[int] = frozenset(), bos: str = "auto",
                       used: set[int] | None = None) -> torch.Tensor:
    """``[nwindows, seqlen]`` token ids from the documents of ``path`` NOT in ``exclude`` (in file order,
    joined with EOS and cut into consecutive windows, BOS per window as :func:`calibration_windows`): a
    held-out text to tune allocation hyper-parameters on, disjoint from the calibration documents. ``used``, a
    set, receives the indices (in the file) of the documents the windows were cut from."""
    if nwindows < 1 or seqlen < 2:
        raise ValueError(f"need nwindows >= 1 and seqlen >= 2, got {nwindows} and {seqlen}")
    mode = bos_mode(tokenizer, bos)
    lead = [tokenizer.bos_token_id] if mode == "window" else []
    texts = read_texts(path)
    keep = [i for i in range(len(texts)) if i not in exclude]
    windows = _cut_windows(tokenizer, [texts[i] for i in keep], mode, nwindows, seqlen - len(lead), path,
                           set() if used is None else used, keep)
    return torch.tensor([lead + w for w in windows], dtype=torch.long).view(-1, seqlen)


def _reference_windows(tokenizer, texts, mode, nsamples, span, rng, path, used) -> list[list[int]]:
    # random.Random(seed) draws the same stream as the reference's random.seed(seed) + random.randint.
    cache: dict[int, list[int]] = {}
    longest, windows = 0, []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(texts) - 1)
            if i not in cache:
                cache[i] = encode(tokenizer, texts[i], mode)
                longest = max(longest, len(cache[i]))
            if len(cache[i]) > span:
                break
            if len(cache) == len(texts) and longest <= span:  # the reference loops forever here
                raise CalibrationError(f"{path}: every document has fewer than one calibration window of {span} "
                                       f"tokens (the longest has {longest}), and the reference sampling slices "
                                       "one document; give a smaller --seqlen or --calib-sampling concat")
        j = rng.randint(0, len(cache[i]) - span - 1)
        used.add(i)
        windows.append(cache[i][j:j + span])
    return windows


def _concat_windows(tokenizer, texts, mode, nsamples, span, rng, path, used) -> list[list[int]]:
    order = list(range(len(texts)))
    rng.shuffle(order)  # the same permutation as shuffling the texts themselves
    return _cut_windows(tokenizer, [texts[i] for i in order], mode, nsamples, span, path, used, order)


def _cut_windows(tokenizer, texts, mode, nsamples, span, path, used, index=None) -> list[list[int]]:
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    need, ids = nsamples * span, []
    for k, text in enumerate(texts):  # tokenize only as many documents as the windows need
        ids += encode(tokenizer, text, mode) + sep
        used.add(k if index is None else index[k])
        if len(ids) >= need:
            break
    have = len(ids) // span
    if have == 0:
        raise CalibrationError(f"{path} has {len(ids)} tokens, fewer than one calibration window of {span}; "
                               "give a longer file or a smaller --seqlen")
    if have < nsamples:
        warnings.warn(f"{path} gives only {have} windows of {span} tokens; using {have} instead of "
                      f"{nsamples} calibration samples", stacklevel=3)
    return [ids[k * span:(k + 1) * span] for k in range(min(have, nsamples))]
