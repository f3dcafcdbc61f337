"""Recovery: fine-tune the kept weights of a pruned (sparse) checkpoint toward the dense model it came from, masks
frozen exactly. ``trainer`` runs it end to end (logit KD, SquareHead, cross-entropy) and writes the checkpoint;
``block`` reconstructs one decoder layer at a time instead; ``trainable`` is how masks stay frozen, ``teacher`` how
a teacher's hidden states meet a rotated student's, ``losses``, ``windows`` (training and held-out text, never the
calibration documents or an evaluation text), ``steps`` (AdamW, schedule, autocast), ``state`` (resume),
``config`` and ``result``. Imports format, nn, models and data; the runtime never imports it."""
from .config import LOSSES, RecoverConfig
from .result import RecoverResult
from .trainer import recover, recover_model
from .windows import recovery_windows

__all__ = ["LOSSES", "RecoverConfig", "RecoverResult", "recover", "recover_model", "recovery_windows"]
