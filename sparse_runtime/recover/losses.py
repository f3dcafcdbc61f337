"""The recovery losses: logit distillation (KL), SquareHead (per-layer normalized MSE on decoder-layer outputs, plus
the KL), plain next-token cross-entropy, and the normalized MSE block reconstruction trains each layer on."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..models.architecture import find_decoder_layers
from .teacher import into_student


# rows of logits per chunk of the KD loss: a chunk's float32 temporaries (a few [rows, vocab]) stay in cache
KD_ROWS = 64


def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over tokens, scaled by T^2."""
    v = student_logits.shape[-1]
    return _KD.apply(student_logits.reshape(-1, v), teacher_logits.reshape(-1, v).detach(), float(temperature))


class _KD(torch.autograd.Function):
    """The KD loss and its gradient in one pass over row chunks, in float32: the whole-batch form materialised a
    dozen float32 [tokens, vocab] tensors (50M elements each for 4 x 256 tokens of a 49k vocabulary) and took a
    third of a CPU training step. d/ds of T^2 KL(p_t || softmax(s / T)) = T (softmax(s / T) - p_t)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        n = s.shape[0]
        grad = torch.empty_like(s)
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        for i in range(0, n, KD_ROWS):
            ls = F.log_softmax(s[i:i + KD_ROWS].float() / temperature, -1)
            lt = F.log_softmax(t[i:i + KD_ROWS].float() / temperature, -1)
            pt = lt.exp()
            total += (pt * (lt - ls)).sum(dtype=torch.float64)
            grad[i:i + KD_ROWS] = ls.exp_().sub_(pt).mul_(temperature / n)
        ctx.save_for_backward(grad)
        return (total * temperature ** 2 / n).float()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None


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
