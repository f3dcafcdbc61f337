"""A recovery run's resumable state, written atomically: the trained tensors, the optimizer's moments, the step
(which fixes the learning rate and the next windows), the RNG, the history so far, and the run's identity (a
resume under other settings is refused)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SparseRuntimeError
from ..models.saving import recover_interrupted_save, write_atomic_dir

STATE_FILE = "recovery_state.pt"


class ResumeError(SparseRuntimeError, ValueError):
    """The saved state does not belong to this run."""


def save_state(folder, step: int, params, optimizer, identity: dict, history: dict) -> None:
    """``params``: ``(name, parameter)`` of everything trained so far (a block run: every layer's)."""
    state = {"step": step, "params": {n: p.detach().cpu().clone() for n, p in params},
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "rng": torch.get_rng_state(), "identity": identity, "history": history}

    def write(tmp: Path) -> None:
        torch.save(state, tmp / STATE_FILE)

    write_atomic_dir(Path(folder), write)


def load_state(folder, identity: dict) -> dict | None:
    """The saved state of the run ``identity`` describes, or None where none was saved."""
    folder = Path(folder)
    recover_interrupted_save(folder)
    f = folder / STATE_FILE
    if not f.exists():
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ResumeError(f"{f}: unreadable recovery state ({e})") from None
    if state.get("identity") != identity:
        diff = sorted(k for k in {*identity, *state.get("identity", {})}
                      if identity.get(k) != state.get("identity", {}).get(k))
        raise ResumeError(f"{f} was saved by a run with other settings ({', '.join(diff)}); resume with the same "
                          "ones, or give another state folder")
    return state


def restore(state: dict, params) -> None:
    """The saved tensors into ``params`` (``(name, parameter)``), and the RNG."""
    saved = state["params"]
    missing = [n for n, _ in params if n not in saved]
    if missing:
        raise ResumeError(f"the saved state lacks {missing[:3]}: it is not this model's")
    with torch.no_grad():
        for n, p in params:
            p.copy_(saved[n])
    torch.set_rng_state(state["rng"])
