"""The recovery losses: logit distillation (KL), SquareHead (per-layer normalized MSE on decoder-layer outputs, plus
the KL), plain next-token cross-entropy, and the normalized MSE block reconstruction trains each layer on."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..models.architecture import find_decoder_layers
from .teacher import into_student


def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over tokens, scaled by T^2."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, -1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the windows ``ids`` [B, L] under ``logits`` [B, L, V]."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def nmse(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||student - target||^2 / ||target||^2`` (SquareHead's per-layer normalization; ``target`` in float32)."""
    return (student.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def squarehead(student_states: dict, teacher_states: dict, bases) -> torch.Tensor:
    """Mean over decoder layers of :func:`nmse`, the teacher's states taken into the student's coordinates."""
    terms = [nmse(student_states[i], into_student(teacher_states[i], None if bases is None else bases[i]))
             for i in sorted(teacher_states)]
    return torch.stack(terms).mean()


class LayerOutputs:
    """The outputs of every decoder layer of ``model`` during a :meth:`recording` forward, by layer index.

    Recording stops when that forward returns: under activation checkpointing the backward pass re-runs the
    layers, and keeping the re-run's outputs would keep their activations alive."""

    def __init__(self, model: nn.Module):
        layers, _ = find_decoder_layers(model)
        self.states: dict[int, torch.Tensor] = {}
        self._on = False
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i):
        def hook(module, args, out):
            if self._on:
                self.states[i] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    @contextmanager
    def recording(self):
        self.states = {}
        self._on = True
        try:
            yield self.states
        finally:
            self._on = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.states = {}
