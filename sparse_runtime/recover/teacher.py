"""The teacher a sparse model recovers from: whether it can teach it, and where its hidden states lie in the
student's coordinates.

Logit losses need only the same vocabulary. Losses on decoder-layer outputs (SquareHead, block reconstruction)
need the same decoder stack, and, for a rotated student (see :mod:`sparse_runtime.models.residual_rotation`), the
residual basis ``Q_i`` of each of its layers: the student's layer ``i`` outputs ``h @ Q_i`` where the dense model
outputs ``h``. The checkpoint keeps only the boundary rotations ``Q_{i-1}^T Q_i``; ``Q_0`` went into the embedding
(``E_student = E_dense @ Q_0``), so it is recovered from the two embeddings (orthogonal Procrustes) and checked,
and ``Q_i = Q_0 (Q_0^T Q_1) ... (Q_{i-1}^T Q_i)``."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SparseRuntimeError
from ..models.architecture import find_decoder_layers
from ..models.residual_rotation import BUFFER

# relative error of E_dense @ Q_0 against the student's embedding: 16-bit rounding passes, another model (O(1)) not
EMBEDDING_TOLERANCE = 2e-2


class TeacherMismatch(SparseRuntimeError, ValueError):
    """The teacher cannot teach this student (another vocabulary, another decoder stack, another model)."""


def check_vocabulary(student: nn.Module, teacher: nn.Module, student_tok=None, teacher_tok=None) -> None:
    sv, tv = _vocab_size(student), _vocab_size(teacher)
    if sv != tv:
        raise TeacherMismatch(f"the teacher has a vocabulary of {tv} tokens, the student {sv}: distillation needs "
                              "the same tokenizer (teach with the dense model the checkpoint was pruned from)")
    if student_tok is not None and teacher_tok is not None and student_tok.get_vocab() != teacher_tok.get_vocab():
        raise TeacherMismatch("the teacher's tokenizer maps tokens to other ids than the student's: distillation "
                              "needs the same tokenizer")


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return head.out_features if head is not None else model.config.vocab_size


def residual_bases(student: nn.Module, teacher: nn.Module) -> list[torch.Tensor] | None:
    """Per decoder layer, ``Q_i`` (float32 ``[d, d]``) taking the teacher's layer output into the student's
    coordinates; None where they share coordinates (an unrotated student). Raises :class:`TeacherMismatch` for a
    teacher with another decoder stack or other embeddings."""
    s_layers, _ = find_decoder_layers(student)
    t_layers, _ = find_decoder_layers(teacher)
    es, et = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
    if len(s_layers) != len(t_layers) or es.shape != et.shape:
        raise TeacherMismatch(f"the teacher has {len(t_layers)} decoder layers of width {et.shape[1]}, the student "
                              f"{len(s_layers)} of width {es.shape[1]}: losses on layer outputs (squarehead, block) "
                              "need the dense model the checkpoint was pruned from")
    es, et = es.detach().float().cpu(), et.detach().float().cpu()
    rotated = [getattr(layer, BUFFER, None) for layer in s_layers]
    if all(r is None for r in rotated) and torch.equal(es, et):
        return None
    u, _, vh = torch.linalg.svd(et.T @ es)
    q = u @ vh  # argmin ||E_t Q - E_s|| over orthogonal Q
    err = float((et @ q - es).norm() / es.norm().clamp_min(1e-30))
    if not err < EMBEDDING_TOLERANCE:
        raise TeacherMismatch(f"the student's embedding is not the teacher's in rotated coordinates (relative error "
                              f"{err:.1e}): losses on layer outputs need the dense model the checkpoint was pruned "
                              "from")
    bases = []
    for r in rotated:
        if r is not None:
            r = r.detach().float().cpu()
            q = q @ (torch.block_diag(*r) if r.dim() == 3 else r)
        bases.append(q)
    return bases


def into_student(hidden: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """A teacher hidden state in the student's coordinates (float32)."""
    hidden = hidden.float()
    return hidden if basis is None else hidden @ basis.to(hidden.device)
