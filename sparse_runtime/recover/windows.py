"""The token windows a recovery run trains and evaluates on, kept apart from what must not be trained on.

From the training file (default: the C4 sample) come, in file order, first the held-out windows the run's
perplexity is measured on, then the training windows, both from documents the checkpoint's calibration did not
use (its ``pruning.calibration`` record says how it drew them; they are redrawn to know which). An evaluation text
(WikiText-2's test split, or any file named in ``forbid``) is refused as training text. The training windows are
visited in a fresh seeded order each epoch; which window a step takes depends only on the step, so a resumed run
reads what an uninterrupted one would."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.calibration import DEFAULT_CALIB, DEFAULT_EVAL, calibration_windows, validation_windows
from ..errors import SparseRuntimeError


class TrainingTextError(SparseRuntimeError, ValueError):
    """The training text is missing, is an evaluation text, or is too short."""


@dataclass
class Windows:
    train: torch.Tensor  # [N, L] token ids
    held_out: torch.Tensor  # [E, L]
    info: dict = field(default_factory=dict)

    def rows(self, step: int, size: int, seed: int) -> torch.Tensor:
        """The indices of the ``size`` training windows of optimizer step ``step``: consecutive in the epoch's
        seeded permutation."""
        n = len(self.train)
        rows = []
        for k in range(step * size, (step + 1) * size):
            epoch, pos = divmod(k, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            rows.append(order[pos])
        return torch.stack(rows)

    def batch(self, step: int, size: int, seed: int) -> torch.Tensor:
        """The token ids ``[size, L]`` of optimizer step ``step``."""
        return self.train[self.rows(step, size, seed)]


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_training_text(path, forbid=()) -> Path:
    path = Path(path)
    if not path.is_file():
        raise TrainingTextError(f"training text {path} not found")
    for other in (DEFAULT_EVAL, *forbid):
        if _same_file(path, other):
            raise TrainingTextError(f"{path} is an evaluation text: training on it would make its perplexity "
                                    "meaningless; train on calibration-style text (the C4 sample) instead")
    return path


def calibration_documents(tokenizer, path, record: dict | None) -> set[int]:
    """The documents of ``path`` the checkpoint's calibration windows came from (empty if it was calibrated on
    another file, or not at all)."""
    if not record or not _same_file(record.get("file", ""), path):
        return set()
    used: set[int] = set()
    bos = record.get("bos") if record.get("bos") in ("window", "document") else "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibration_windows(tokenizer, path, record["nsamples"], record["seqlen"], record.get("seed", 0),
                            sampling=record.get("sampling", "reference"), bos=bos, used=used)
    return used


def recovery_windows(tokenizer, path=DEFAULT_CALIB, nwindows: int = 1, seqlen: int = 256, held_out: int = 16,
                     calibration: dict | None = None, forbid=()) -> Windows:
    """``held_out`` evaluation windows and up to ``nwindows`` training windows of ``seqlen`` tokens from ``path``,
    none from the documents ``calibration`` (a checkpoint's ``pruning.calibration`` record) drew."""
    path = check_training_text(path, forbid)
    exclude = calibration_documents(tokenizer, path, calibration)
    held: set[int] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few windows is said below, in recovery's terms
        ev = validation_windows(tokenizer, path, held_out, seqlen, exclude=exclude, used=held)
        try:
            train = validation_windows(tokenizer, path, nwindows, seqlen, exclude=exclude | held)
        except SparseRuntimeError:
            raise TrainingTextError(f"{path}: no text left for one training window of {seqlen} tokens after the "
                                    f"{len(exclude)} calibration and {len(held)} held-out documents") from None
    if len(train) < nwindows:
        warnings.warn(f"{path} gives {len(train)} training windows of {seqlen} tokens; the run needs "
                      f"{nwindows} and revisits them ({-(-nwindows // len(train))} epochs)", stacklevel=2)
    info = {"file": str(path), "seqlen": seqlen, "train_windows": len(train), "held_out_windows": len(ev),
            "calibration_documents_excluded": len(exclude), "held_out_documents": len(held)}
    return Windows(train, ev, info)
