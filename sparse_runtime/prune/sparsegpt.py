"""SparseGPT (Frantar & Alistarh 2023): prune column by column with OBS updates from the inverse Hessian."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..format.codec import parse_pattern
from ..format.masks import check_prior, steer
from .statistics import Hessian, Method


def check_refit(refit) -> None:
    if isinstance(refit, bool) or not isinstance(refit, int) or refit < 0:
        raise ValueError(f"refit takes a number of conjugate-gradient steps >= 0, not {refit!r}")


def check_blocksize(blocksize, pattern: str) -> None:
    nm = parse_pattern(pattern)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize takes a number of columns >= 1, not {blocksize!r}")
    if nm and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of the group size {nm[1]}")


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


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, pattern: str = "2:4", sparsity: float = 0.5,
                    blocksize: int = 128, damp: float = 0.01, refit: int = 0, prior: torch.Tensor | None = None,
                    toward: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned weight in weight's dtype, keep mask)`` for one matrix ``[out, in]`` and its Hessian ``[in, in]``.

    ``refit`` > 0 then re-solves the kept weights on SparseGPT's mask (:func:`refit_masked`, that many
    conjugate-gradient steps): SparseGPT freezes each column once it is passed, so its kept weights are not the
    least-squares optimum for the mask it chose. ``prior``, ``toward``: each choice (a block's, a group's) is
    steered as :func:`~sparse_runtime.format.masks.steer` says."""
    check_refit(refit)
    check_blocksize(blocksize, toward or pattern)
    nm = parse_pattern(pattern)
    W = weight.detach().float().clone()
    prior = None if prior is None else prior.to(W.device, torch.bool)  # once, not per group
    W0 = W.clone() if refit else None
    cols = W.shape[1]
    Hinv, dead, Hd = damped_inverse(H, damp, device=W.device, upper=True, keep_damped=bool(refit))
    W[:, dead] = 0  # inputs never active: prune freely
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        if nm is None:  # adaptive mask: the block's lowest w^2 / [H^-1]_cc^2 across all its rows
            score = steer(saliency(W1, d.pow(2)), None if prior is None else prior[:, i1:i2], toward)
            k = int(score.numel() * sparsity)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                mask1.view(-1)[torch.topk(score.view(-1), k, largest=False).indices] = True
        else:
            n, m = nm
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm and i % m == 0:  # choose this group's pruned entries from the already-updated weights
                score = saliency(W1[:, i:i + m], d[i:i + m].pow(2))
                if prior is not None:
                    score = steer(score, prior[:, i1 + i:i1 + i + m])
                mask1.scatter_(1, i + torch.topk(score, m - n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the columns after the block
    check_prior(~pruned, prior)
    if refit:
        W = refit_masked(W0, Hd, ~pruned, W, refit)
    return W.to(weight.dtype), ~pruned


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


def prune_linear(linear, stats: Hessian, pattern: str, sparsity: float, config, prior=None) -> torch.Tensor:
    w, mask = sparsegpt_prune(linear.weight, stats.H, pattern, sparsity, config.blocksize, config.damp, config.refit,
                              prior, config.toward)
    linear.weight.copy_(w)
    return mask


SPARSEGPT = Method("sparsegpt", Hessian, prune_linear)
