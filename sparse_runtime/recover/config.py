"""What a recovery run is asked to do (:class:`RecoverConfig`), its contradictions refused before any model loads,
and the learning-rate schedule it follows."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

LOSSES = ("kd", "squarehead", "ce", "block")


@dataclass(frozen=True)
class RecoverConfig:
    """A recovery run. ``tokens`` is the training budget: ``steps = ceil(tokens / (batch * seqlen))`` optimizer
    steps over windows of ``seqlen`` tokens (``block``: the budget summed over the decoder layers, each trained
    in turn). AdamW at ``lr`` after ``warmup`` (a fraction of the steps) of linear warm-up, then cosine decay to
    ``lr * min_lr``; gradients clipped to norm ``clip``. ``eval_every`` tokens (0: only before and after) the
    perplexity of ``eval_windows`` held-out windows is measured. ``state`` is the folder the resumable state is
    written to every ``save_every`` steps (and when the run stops); ``stop_after`` ends this session after that
    many steps in all, state saved, so a later call with ``resume`` continues it. ``embeddings`` trains the input
    embedding and the output head too (by default they stay as they are). A quantized layer's codes train at
    ``code_lr`` (grid steps, warmed up and decayed alike), the rest at ``lr``. ``keep_best`` ends the run with the
    trained tensors of its evaluation of lowest held-out perplexity (the held-out windows of the training text,
    never an evaluation text), not its last step's (not resumable: the snapshot is not part of the saved state)."""
    loss: str = "kd"
    tokens: int = 100_000
    seqlen: int = 256
    batch: int = 4
    lr: float = 1e-4
    code_lr: float = 0.005
    warmup: float = 0.05
    min_lr: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    temperature: float = 1.0
    eval_every: int = 0
    eval_windows: int = 16
    seed: int = 0
    device: str | None = None
    checkpointing: bool = True
    embeddings: bool = False
    autocast: bool | None = None  # None: bf16 autocast where the device multiplies bf16 natively
    block_windows: int = 128  # block: the calibration windows each layer is reconstructed on
    state: str | None = None
    save_every: int = 0
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True
    keep_best: bool = False

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("tokens", "seqlen", "batch", "eval_windows", "block_windows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2 (a token and its successor), got {self.seqlen}")
        if not self.lr > 0 or not self.code_lr > 0 or not 0 <= self.warmup < 1 or not 0 <= self.min_lr <= 1:
            raise ValueError(f"need lr > 0, code_lr > 0, 0 <= warmup < 1 and 0 <= min_lr <= 1; got lr={self.lr}, "
                             f"code_lr={self.code_lr}, warmup={self.warmup}, min_lr={self.min_lr}")
        if not self.clip > 0 or self.weight_decay < 0 or not self.temperature > 0:
            raise ValueError(f"need clip > 0, weight_decay >= 0 and temperature > 0; got {self.clip}, "
                             f"{self.weight_decay}, {self.temperature}")
        if self.eval_every < 0 or self.save_every < 0 or (self.stop_after is not None and self.stop_after < 1):
            raise ValueError("eval_every and save_every must be >= 0 and stop_after >= 1")
        if self.keep_best and self.loss == "block":
            raise ValueError("keep_best needs an end-to-end loss: block trains one layer at a time")
        if self.keep_best and (self.resume or self.stop_after or self.save_every):
            raise ValueError("keep_best is not resumable (its snapshot is not saved with the state): leave out "
                             "resume, stop_after and save_every")
        if (self.resume or self.stop_after or self.save_every) and not self.state:
            raise ValueError("resume, stop_after and save_every need a state folder (state=...)")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch * self.seqlen))

    def replace(self, **changes) -> "RecoverConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """The fields a resumed run must share with the run it continues (the rest only say how it runs)."""
        run_only = {"eval_every", "device", "state", "save_every", "resume", "stop_after", "progress"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in run_only}


def lr_at(config: RecoverConfig, step: int, steps: int | None = None, peak: float | None = None) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``steps`` for a peak of ``peak`` (default
    ``config.lr``): linear warm-up, then cosine decay."""
    steps, peak = steps or config.steps, config.lr if peak is None else peak
    warm = int(config.warmup * steps)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * t)))
