"""SparseGPT (Frantar & Alistarh 2023): prune column by column with OBS updates from the inverse Hessian, and
optionally quantize the kept weights in the same sweep (the paper's joint 2:4 + 4-bit)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ShapeError
from ..format.codec import parse_pattern
from ..format.masks import check_prior, steer
from ..format.quant import QuantScheme, fake_quantize
from .quantize import choose_scales
from .statistics import Hessian, Method, Pruned


def check_refit(refit) -> None:
    if isinstance(refit, bool) or not isinstance(refit, int) or refit < 0:
        raise ValueError(f"refit takes a number of conjugate-gradient steps >= 0, not {refit!r}")


def check_blocksize(blocksize, pattern: str, quant: QuantScheme | None = None) -> None:
    """A column block holds whole N:M groups and whole quantization groups (a group's scale is set from the
    group's updated weights when the sweep enters it, so a group must not straddle a lazy block update)."""
    nm = parse_pattern(pattern)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize takes a number of columns >= 1, not {blocksize!r}")
    if nm and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of the group size {nm[1]}")
    if quant is not None and quant.group_size and blocksize % quant.group_size:
        raise ValueError(f"blocksize {blocksize} must be a multiple of the {quant.name} group size "
                         f"{quant.group_size}")


class DampedInverse(NamedTuple):
    inverse: torch.Tensor  # H^-1 of the damped H, or its upper Cholesky factor U (U^T U = H^-1)
    dead: torch.Tensor  # [in] bool: inputs never active
    damped: torch.Tensor | None  # the damped H itself, when asked for


def damped_inverse(H: torch.Tensor, damp: float, *, dtype=torch.float32, device=None, upper: bool = False,
                   keep_damped: bool = False) -> DampedInverse:
    """SparseGPT's inverse Hessian, in ``dtype`` on ``device`` (default ``H``'s): inputs never active (0 on the
    diagonal: no information) get 1 there, then ``damp`` times the mean diagonal is added, and the result is
    inverted through its Cholesky factor. ``upper`` returns the upper Cholesky factor of the inverse instead,
    the factor SparseGPT's column-by-column updates read. ``H`` is not changed."""
    H = H.to(device or H.device, dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    damped = H.clone() if keep_damped else None
    # one step at a time, dropping each input: at most two [in, in] copies live (~1.6 GB at 14336 in fp32)
    try:
        L = torch.linalg.cholesky(H)
        del H
        inverse = torch.cholesky_inverse(L)
        del L
        if upper:
            inverse = torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"SparseGPT: the damped Hessian is not positive definite ({e}); raise damp "
                         f"(now {damp})") from None
    return DampedInverse(inverse, dead, damped)


def saliency(weight: torch.Tensor, u_sq: torch.Tensor) -> torch.Tensor:
    """SparseGPT's cost of pruning each weight, ``w_ij^2 / U_jj^2`` for the upper Cholesky factor ``U`` of
    ``H^-1`` (``u_sq``: ``diag(U)^2`` ``[in]``, or the slice of the columns ``weight`` holds): it prunes columns in
    order and updates only later ones, so column ``j`` costs ``w_j^2 / [(H_{j:, j:})^-1]_00 = w_j^2 / U_jj^2``."""
    return weight.pow(2) / u_sq.unsqueeze(0)


class Solved(NamedTuple):
    weight: torch.Tensor  # in the input weight's dtype: pruned, and on the grid when quantized
    keep: torch.Tensor  # [out, in] bool (all True for a dense quantizer)
    scales: torch.Tensor | None  # [out, groups] in the weight's dtype, when quantized


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, pattern: str = "2:4", sparsity: float = 0.5,
                    blocksize: int = 128, damp: float = 0.01, refit: int = 0, prior: torch.Tensor | None = None,
                    toward: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned weight in weight's dtype, keep mask)`` for one matrix ``[out, in]`` and its Hessian ``[in, in]``.

    ``refit`` > 0 then re-solves the kept weights on SparseGPT's mask (:func:`refit_masked`, that many
    conjugate-gradient steps): SparseGPT freezes each column once it is passed, so its kept weights are not the
    least-squares optimum for the mask it chose. ``prior``, ``toward``: each choice (a block's, a group's) is
    steered as :func:`~sparse_runtime.format.masks.steer` says."""
    solved = sparsegpt_solve(weight, H, pattern, sparsity, blocksize, damp, refit, prior=prior, toward=toward)
    return solved.weight, solved.keep


@torch.no_grad()
def sparsegpt_solve(weight: torch.Tensor, H: torch.Tensor, pattern: str = "2:4", sparsity: float = 0.5,
                    blocksize: int = 128, damp: float = 0.01, refit: int = 0, quant: QuantScheme | None = None,
                    keep: torch.Tensor | None = None, prior: torch.Tensor | None = None,
                    toward: str | None = None, scale_search: bool = False) -> Solved:
    """SparseGPT's prune of one matrix, optionally quantized jointly (the paper's 2:4 + 4-bit): each kept column is
    rounded to ``quant``'s grid as the sweep passes it and its rounding error, like the pruned weights' error, is
    spread over the later columns. ``keep`` fixes the mask instead of choosing one (``pattern`` and ``sparsity``
    unused); all True with ``quant`` is GPTQ, the dense quantizer of the same sweep. ``prior``, ``toward``: each
    choice (a block's, a group's, a quantization group's provisional one) is steered as
    :func:`~sparse_runtime.format.masks.steer` says; a mask that would restore a weight ``prior`` pruned is refused.
    ``scale_search``: each quantization group's scale is searched (:func:`~.quantize.choose_scales`), not its absmax.

    With ``refit`` and ``quant``, the sweep prunes only, the kept weights are re-solved in full precision, and a
    second sweep with the mask fixed quantizes them (the refit would undo a joint sweep's rounding)."""
    check_refit(refit)
    check_blocksize(blocksize, (toward or pattern) if keep is None else "unstructured", quant)
    W = weight.detach().float().clone()
    if quant is not None:
        quant.groups(W.shape[1])
    if keep is not None and keep.shape != W.shape:
        raise ShapeError(f"keep mask {tuple(keep.shape)} does not match the weight {tuple(W.shape)}")
    prior = None if prior is None else prior.to(W.device, torch.bool)  # once, not per group
    W0 = W.clone() if refit else None
    Hinv, dead, Hd = damped_inverse(H, damp, device=W.device, upper=True, keep_damped=bool(refit))
    W[:, dead] = 0  # inputs never active: prune freely
    joint = None if refit else quant
    if keep is None:
        W, pruned, scales = _sweep(W, Hinv, blocksize, weight.dtype, choose=(parse_pattern(pattern), sparsity),
                                   quant=joint, prior=prior, toward=toward, search=scale_search)
    else:
        W, pruned, scales = _sweep(W, Hinv, blocksize, weight.dtype, pruned=~keep.to(W.device, torch.bool),
                                   quant=joint, search=scale_search)
    check_prior(~pruned, prior)
    if refit:
        W = refit_masked(W0, Hd, ~pruned, W, refit)
        if quant is not None:
            W, _, scales = _sweep(W, Hinv, blocksize, weight.dtype, pruned=pruned, quant=quant, search=scale_search)
    return Solved(W.to(weight.dtype), ~pruned, scales)


def _nm_pruned(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The ``m - n`` lowest scores of every ``m`` consecutive columns of ``score`` ``[out, k * m]``, as a bool mask."""
    groups = score.reshape(score.shape[0], -1, m)
    low = torch.topk(groups, m - n, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, low, True).reshape(score.shape)


def _sweep(W, Hinv, blocksize, dtype, choose=None, pruned=None, quant=None, prior=None, toward=None, search=False):
    """SparseGPT's left-to-right pass over the columns of ``W`` (fp32, changed in place) with the upper Cholesky
    factor ``Hinv`` of ``H^-1``: each column is pruned and, with ``quant``, rounded to the grid, and its error is
    spread over the later columns. The mask is ``pruned`` (fixed), or chosen on the way when ``choose`` =
    ``(nm, sparsity)``: per block of columns across all rows (unstructured), or per group of ``m`` columns from the
    already-updated weights (N:M), each choice steered by ``prior`` and ``toward`` (:func:`steer`).
    ``(W, pruned, scales [out, groups] in dtype or None)``.

    A quantization group's scale is fixed when the sweep reaches its first column, from the current weights of the
    group's kept entries (their absmax, or searched with ``search``: :func:`~.quantize.choose_scales`): where the
    mask is not chosen yet, as it would be chosen from those weights now (N:M groups), or every entry (unstructured
    columns past the current block; only a per-row scale spans past a block). Later updates that outgrow the scale
    are clipped to the grid's end."""
    rows, cols = W.shape
    nm, sparsity = choose or (None, None)
    if choose is not None:
        pruned = torch.zeros_like(W, dtype=torch.bool)
    span = (quant.group_size or cols) if quant is not None else None
    per_row = None if quant is None else QuantScheme(quant.name)  # one group's slice: one scale per row
    scales = None if quant is None else torch.empty(rows, cols // span, dtype=dtype, device=W.device)
    u_sq = Hinv.diagonal().pow(2)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        mask1 = pruned[:, i1:i2].clone()
        if choose is not None and nm is None:  # adaptive mask: the block's lowest w^2 / [H^-1]_cc^2 across all rows
            score = steer(saliency(W1, d.pow(2)), None if prior is None else prior[:, i1:i2], toward)
            k = int(score.numel() * sparsity)
            if k:
                mask1.view(-1)[torch.topk(score.view(-1), k, largest=False).indices] = True
        for i in range(i2 - i1):
            if choose is not None and nm and i % nm[1] == 0:  # this group's pruned entries, from the updated weights
                score = saliency(W1[:, i:i + nm[1]], d[i:i + nm[1]].pow(2))
                mask1[:, i:i + nm[1]] = _nm_pruned(_steered(score, prior, i1 + i), *nm)
            c = i1 + i
            if quant is not None and c % span == 0:
                inside = c + span <= i2  # else a per-row scale at column 0, before any update
                cur = W1[:, i:i + span] if inside else W[:, c:c + span]
                if choose is not None and nm:
                    drop = _nm_pruned(_steered(saliency(cur, u_sq[c:c + span]), prior, c), *nm)
                else:
                    drop = mask1[:, i:i + span]
                    if not inside:
                        drop = torch.cat([drop, pruned[:, i2:c + span]], 1)  # fixed, or not chosen yet (False)
                scales[:, c // span] = choose_scales(cur.to(dtype), per_row, ~drop, search)[:, 0]
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            if quant is not None:
                g = c // span
                q = fake_quantize(q.unsqueeze(1), quant, scales[:, g:g + 1])[:, 0].float()
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the columns after the block
    return W, pruned, scales


def _steered(score: torch.Tensor, prior: torch.Tensor | None, first: int) -> torch.Tensor:
    """``score`` of the columns from ``first`` on, with the entries ``prior`` pruned there lowest."""
    return score if prior is None else steer(score, prior[:, first:first + score.shape[1]])


@torch.no_grad()
def refit_masked(w0: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, w: torch.Tensor, steps: int) -> torch.Tensor:
    """Kept weights closer to ``argmin (x - w0) H (x - w0)^T`` over x zero outside ``keep``, row by row, by
    ``steps`` Jacobi-preconditioned conjugate-gradient steps from ``w``; every row's error only falls (each row
    keeps the better of ``w`` and the result). All fp32, one ``[out, in] @ [in, in]`` product per step."""
    def error(x):
        d = x - w0
        return ((d @ H) * d).sum(1)

    keep = keep.float()
    dinv = 1 / torch.diag(H)
    start = x = w * keep
    r = (w0 - x) @ H * keep  # minus the gradient, on the kept entries only
    z = r * dinv
    p, rz = z, (r * z).sum(1, keepdim=True)
    for _ in range(steps):
        ap = p @ H * keep
        pap = (p * ap).sum(1, keepdim=True)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-30), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        z = r * dinv
        rz_new = (r * z).sum(1, keepdim=True)
        p = z + torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz)) * p
        rz = rz_new
    return torch.where((error(x) < error(start)).unsqueeze(1), x, start)


def prune_linear(linear, stats: Hessian, pattern: str, sparsity: float, config, prior=None) -> Pruned:
    solved = sparsegpt_solve(linear.weight, stats.H, pattern, sparsity, config.blocksize, config.damp, config.refit,
                             config.quant, prior=prior, toward=config.toward, scale_search=config.scale_search)
    linear.weight.copy_(solved.weight)
    return Pruned(solved.keep, solved.scales)


SPARSEGPT = Method("sparsegpt", Hessian, prune_linear)
