"""What every writer of a model folder shares: atomic folder writes, tied-weight de-duplication and the
tokenizer of the folder a model came from.

A folder ``NAME`` is written as ``.NAME.tmp-PID-*`` beside it, then swapped into place in one step
(``renameat2(RENAME_EXCHANGE)``), so the path always holds the old folder or the new one; the old one, now under
the temporary name, is then deleted. Where the kernel or filesystem cannot exchange, the old folder is renamed to
``.NAME.old-PID`` first, and a writer killed between the two renames leaves nothing at the path: the next load or
save puts that folder back. Each save removes the debris of writers that are no longer alive (their PID is in the
name; a folder shared by several machines is outside what this checks).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
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


def _renameat2():
    """libc's ``renameat2`` (glibc 2.28+, Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where this system cannot (the caller falls back to two renames)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no such call, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _debris(out_dir: Path) -> list[tuple[Path, str, int]]:
    """``(folder, "tmp" or "old", writer PID)`` for each temporary or displaced folder of ``out_dir``."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(tmp|old)-(\d+)(-.*)?")
    found = []
    with os.scandir(out_dir.parent) as entries:
        for e in entries:
            m = pattern.fullmatch(e.name)
            if m:
                found.append((Path(e.path), m[1], int(m[2])))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover_interrupted_save(out_dir: Path) -> None:
    """Put back the folder a save killed between its two renames left as ``.NAME.old-PID`` (nothing at the path)."""
    out_dir = Path(out_dir)
    if out_dir.exists() or not out_dir.parent.is_dir():
        return
    old = [p for p, kind, pid in _debris(out_dir) if kind == "old" and not _alive(pid)]
    if old:
        try:
            os.rename(max(old, key=lambda p: p.stat().st_mtime), out_dir)
        except OSError:
            pass  # another process recovered it first, or the folder is read-only: loading says what is missing


def _remove_debris(out_dir: Path) -> None:
    for path, _, pid in _debris(out_dir):
        if not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def write_atomic_dir(out_dir: Path, write) -> None:
    """Run ``write(folder)`` on a fresh temporary folder, then swap it in at ``out_dir`` in one step."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(out_dir)
    _remove_debris(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        write(tmp)
        if not out_dir.exists():
            os.rename(tmp, out_dir)
        elif not _exchange(tmp, out_dir):
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder after a swap; the new one if anything failed


def tokenizer_from_source(config):
    src = getattr(config, "_name_or_path", "") or ""
    if src and Path(src).is_dir():
        try:
            return AutoTokenizer.from_pretrained(src)
        except Exception:
            return None
    return None
