"""What every writer of a model folder shares: atomic folder writes, tied-weight de-duplication and the
tokenizer of the folder a model came from."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn
from transformers import AutoTokenizer


def tied_duplicates(model: nn.Module) -> set[str]:
    """State-dict keys that share storage with an earlier key (tied weights): saved once."""
    seen, dups = {}, set()
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            dups.add(name)
        elif key is not None:
            seen[key] = name
    return dups


def write_atomic_dir(out_dir: Path, write) -> None:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tokenizer_from_source(config):
    src = getattr(config, "_name_or_path", "") or ""
    if src and Path(src).is_dir():
        try:
            return AutoTokenizer.from_pretrained(src)
        except Exception:
            return None
    return None
