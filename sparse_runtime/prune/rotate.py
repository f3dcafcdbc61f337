"""Learning DenoiseRotator rotations for one decoder layer before it is pruned.

Two orthogonal matrices per layer: ``Q1`` on the residual stream (``[d, d]`` or ``k`` diagonal blocks) and ``R2``
per KV head on the value path, each the Q factor of the QR decomposition of an unconstrained matrix initialised to
``I``, trained with Adam (lr 0.01, gradient norm clipped to 1.0), the best iterate kept. They are scored by the
pruning method's own importance in rotated coordinates (squared OBD forms, as the reference):

* magnitude ``W'^2``; Wanda ``W'^2 * diag(R^T H R)``; SparseGPT ``W'^2 / diag(U)^2`` with ``R^T H^-1 R = U^T U``
  (the score SparseGPT ranks by: its column-by-column updates make the upper Cholesky factor, not ``H^-1``, count),

with ``H = (2/n) X X^T`` of each linear's input. Only four inputs exist per layer (attention in, o in, MLP in,
down in), so each rotated scale is computed once per step, not once per linear. Wanda needs only ``diag(R^T H R)``,
which for block-diagonal ``R`` reads only the diagonal blocks of ``H``; SparseGPT the whole product and its Cholesky
factor. Objectives:

* ``entropy`` (the paper): Shannon entropy of the normalised scores, summed over rows, along the axis each rotation
  leaves a group total invariant on (rows for q/k/gate/up, columns for down, both for v/o);
* ``nm`` (this project): the importance that the pattern's mask drops: the ``m - n`` smallest scores of every group
  of ``m`` inputs (for unstructured, the row's lowest ``sparsity`` fraction), in units of each linear's mean row
  importance before rotating. Entropy does not see the 2:4 groups at all; this is what 2:4 pruning actually removes,
  so it is what the rotation should shrink. Absolute, not a fraction of each row: Wanda's and SparseGPT's row totals
  change under rotation, and a fraction also falls when the kept scores grow (measured against the fraction: the
  README's rotation results).
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..format.codec import parse_pattern
from ..models.architecture import READERS, WRITERS, find_decoder_layers
from ..models.residual_rotation import (check_layer, fold_norms, head_blocks, head_geometry, rotate_inputs,
                                        rotate_model, rotate_outputs)
from ..ops.devices import cpu_native_bf16
from . import magnitude, wanda
from .config import OBJECTIVES, RotateOptions  # noqa: F401  (OBJECTIVES: the rotation benchmark reads it here)
from .methods import METHODS
from .sparsegpt import damped_inverse, saliency
from .statistics import LayerInputs

IMPORTANCE = tuple(METHODS)
_TINY = 1e-30


def _diag_blocks(a: torch.Tensor, k: int) -> torch.Tensor:
    b = a.shape[0] // k
    return torch.stack([a[i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(k)])


def _rotated_diag(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``diag(Q^T A Q)`` for block-diagonal ``Q [k, b, b]`` from ``A``'s diagonal blocks ``[k, b, b]``."""
    return ((blocks @ q) * q).sum(-2).reshape(-1)


def _saliency_diag(hinv: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """``diag(U)^2`` for ``R^T H^-1 R = U^T U`` (upper Cholesky), ``R`` block-diagonal from ``q [k, b, b]`` (None:
    ``I``): what :func:`~.sparsegpt.saliency` divides by. ``U_jj^2`` lies between ``[H^-1]_jj`` (first column) and
    ``1 / H_jj`` (last), which ``diag(R^T H^-1 R)`` alone would misstate for all but the first."""
    if q is not None:  # block by block: k blocks cost 4 d^3 / k, not the 4 d^3 of a dense block_diag product
        k, b, _ = q.shape
        d = k * b
        hinv = (hinv.reshape(d, k, b).transpose(0, 1) @ q).transpose(0, 1).reshape(d, d)  # H^-1 R
        hinv = (q.transpose(-1, -2) @ hinv.reshape(k, b, d)).reshape(d, d)  # R^T (H^-1 R)
        hinv = (hinv + hinv.T) / 2
    return torch.linalg.cholesky(hinv, upper=True).diagonal().pow(2)


def _inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    return damped_inverse(h, damp, dtype=torch.float64).inverse.float()


class _Importance:
    """The method's own scores (:func:`~.magnitude.scores`, :func:`~.wanda.scores`, :func:`~.sparsegpt.saliency`) of
    rotated weights, squared where they are not already; per input, what its rotation turns into the method's
    statistic: ``diag(R^T H R)`` for Wanda (``H`` is a multiple of its squared input norms), ``diag(U)^2`` for
    SparseGPT; none for magnitude."""

    def __init__(self, method: str, inputs: LayerInputs | None, blocks: int, n_heads: int, hd: int, damp: float):
        if method not in IMPORTANCE:
            raise ValueError(f"rotation importance for {method!r}; choose from {', '.join(IMPORTANCE)}")
        self.divide = method == "sparsegpt"
        self.mats = None
        if method == "magnitude":
            return
        if inputs is None:
            raise ValueError(f"{method} importance needs the layer's input statistics")
        if self.divide:  # SparseGPT's saliency needs all of R^T H^-1 R, not only its diagonal
            self.rotated = _saliency_diag
            self.mats = {k: _inverse(getattr(inputs, k), damp) for k in ("attn", "mlp", "o")}
            self.down = _saliency_diag(_inverse(inputs.down, damp), None)
        else:
            self.rotated = _rotated_diag
            self.mats = {"attn": _diag_blocks(inputs.attn.float(), blocks),
                         "mlp": _diag_blocks(inputs.mlp.float(), blocks), "o": _diag_blocks(inputs.o.float(), n_heads)}
            self.down = torch.diag(inputs.down.float())

    def scales(self, q1, q2_heads):
        if self.mats is None:
            return None
        return {"attn": self.rotated(self.mats["attn"], q1), "mlp": self.rotated(self.mats["mlp"], q1),
                "o": self.rotated(self.mats["o"], q2_heads), "down": self.down}

    def score(self, w, scale):
        if scale is None:
            return magnitude.scores(w, squared=True)
        if self.divide:
            return saliency(w, scale.clamp_min(_TINY))
        return wanda.scores(w, scale.clamp_min(_TINY), squared=True)


def _entropy(s: torch.Tensor, dim: int) -> torch.Tensor:
    p = s / s.sum(dim, keepdim=True).clamp_min(_TINY)
    return -(p * p.clamp_min(_TINY).log()).sum()


def _dropped(s: torch.Tensor, drop: int, m: int) -> torch.Tensor:
    """Per row, the summed ``drop`` smallest scores of each group of ``m`` consecutive entries. The selection is
    made without autograd and applied as a 0/1 mask: the same value and (sub)gradient as differentiating
    ``topk``, at a fraction of its backward's cost."""
    groups = s.reshape(s.shape[0], -1, m)
    with torch.no_grad():
        if (drop, m) == (2, 4):  # 2:4: the second-smallest of each group by a min/max network, then one compare
            a, b, c, d = groups.unbind(-1)
            lo1, lo2 = torch.minimum(a, b), torch.minimum(c, d)
            second = torch.minimum(torch.maximum(lo1, lo2), torch.minimum(torch.maximum(a, b), torch.maximum(c, d)))
            low = groups <= second.unsqueeze(-1)  # ties beyond two: measure zero for rotated weights
        else:
            low = torch.zeros_like(groups, dtype=torch.bool).scatter_(
                -1, groups.topk(drop, dim=-1, largest=False).indices, True)
    return groups.masked_fill(~low, 0).sum((-1, -2))


class _Objective:
    def __init__(self, name: str, pattern: str, sparsity: float):
        self.name, self.nm, self.sparsity = name, parse_pattern(pattern), sparsity
        self.unit = {}  # per linear, its mean row importance at the first call (Q = I): each weighs in equally

    def _drop(self, s):
        if self.nm:
            n, m = self.nm
            return _dropped(s, m - n, m)
        m = s.shape[1]
        return _dropped(s, max(1, int(m * self.sparsity)), m)

    def __call__(self, name: str, s: torch.Tensor) -> torch.Tensor:
        if self.name == "entropy":
            if name == "down":
                return _entropy(s, 0)
            if name in ("v", "o"):
                return _entropy(s, 1) + _entropy(s, 0)
            return _entropy(s, 1)
        if name not in self.unit:  # once per linear: a host read of a sum each step would be wasted
            self.unit[name] = max(float(s.detach().sum()) / s.shape[0], _TINY)
        return self._drop(s).sum() / self.unit[name]


def learning_dtype(device) -> torch.dtype:
    """bf16 where the hardware multiplies it natively (CUDA; CPUs with AVX512-BF16 or AMX), as the reference;
    fp32 elsewhere: on an AVX2-only CPU torch's bf16 matmul is emulated, far slower than fp32. Folding the
    learned rotation is fp32 either way."""
    return torch.bfloat16 if torch.device(device).type == "cuda" or cpu_native_bf16() else torch.float32


def _orthogonal(a: torch.Tensor) -> torch.Tensor:
    # float64 QR: on some CPUs MKL's float32 QR was ~10x slower at d = 576, and the rotation must stay orthogonal
    return torch.linalg.qr(a.double())[0].to(a.dtype)


@torch.enable_grad()
def learn_rotation(layer, inputs: LayerInputs | None, method: str, pattern: str, sparsity: float,
                   opts: RotateOptions, desc: str = "rotate", progress: bool = True):
    """``(Q1, R2, record)`` for a norm-folded, unrotated decoder layer. ``Q1`` is ``[d, d]`` (``blocks == 1``) or
    ``[k, d/k, d/k]``; ``R2`` is ``[n_kv, hd, hd]``; ``record`` has the objective at the start, the best one, the
    per-step history and the seconds spent."""
    t0 = time.perf_counter()
    n_heads, n_kv, hd = head_geometry(layer)
    ws = [layer.get_submodule(p).weight.detach().float() for p in READERS]
    ws += [layer.get_submodule(p).weight.detach().float().T for p in WRITERS]
    sizes = [w.shape[0] for w in ws]
    # every matrix whose d-sized side Q1 rotates, as rows: one matmul per step, in bf16 where that is fast (5x
    # faster than fp32 with AMX; the scores only need to rank)
    dtype = opts.dtype or learning_dtype(ws[0].device)
    stacked = torch.cat(ws).to(dtype)
    d = stacked.shape[1]
    if d % opts.blocks:
        raise ValueError(f"rotate blocks {opts.blocks} do not divide the hidden size {d}")
    b = d // opts.blocks
    eye = torch.eye(b, device=stacked.device)  # A1 and A2 stay fp32
    a1 = torch.nn.Parameter(eye.repeat(opts.blocks, 1, 1))
    a2 = torch.nn.Parameter(torch.eye(hd, device=stacked.device).repeat(n_kv, 1, 1))
    importance = _Importance(opts.importance or method, inputs, opts.blocks, n_heads, hd, opts.damp)
    objective = _Objective(opts.objective, pattern, sparsity)
    optim = torch.optim.Adam([a1, a2], lr=opts.lr)

    def loss_of(q1, q2):
        low = q1.to(stacked.dtype)
        rot = (stacked @ low[0] if opts.blocks == 1 else rotate_inputs(stacked, low)).float()
        wq, wk, wv, wg, wu, wo_t, wd_t = rot.split(sizes)
        q2h = head_blocks(q2, n_heads)
        sc = importance.scales(q1, q2h) or {}
        mats = {"q": (wq, "attn"), "k": (wk, "attn"), "v": (rotate_outputs(wv, q2), "attn"), "gate": (wg, "mlp"),
                "up": (wu, "mlp"), "o": (rotate_inputs(wo_t.T, q2h), "o"), "down": (wd_t.T, "down")}
        return sum(objective(n, importance.score(w, sc.get(key))) for n, (w, key) in mats.items())

    history, best = [], None
    bar = tqdm(range(opts.steps + 1), desc=desc, unit="step", leave=False, disable=not progress)
    for step in bar:
        q1, q2 = _orthogonal(a1), _orthogonal(a2)
        loss = loss_of(q1, q2)
        value = float(loss.detach())
        history.append(value)
        if best is None or value < best[0]:
            best = (value, q1.detach().clone(), q2.detach().clone())
        bar.set_postfix_str(f"{opts.objective} {history[0]:.5g} -> {value:.5g}", refresh=False)
        if step == opts.steps:
            break
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([a1, a2], opts.clip)
        optim.step()
    bar.close()
    value, q1, q2 = best
    record = {"initial": history[0], "best": value, "history": history, "dtype": str(dtype).removeprefix("torch."),
              "seconds": round(time.perf_counter() - t0, 3)}
    return (q1[0] if opts.blocks == 1 else q1), q2, record




def rotate_by_weights(model, pattern: str, sparsity: float, opts: RotateOptions, progress: bool = True) -> dict:
    """Magnitude's rotations: learned on each layer's weights alone (no data), then folded into the model."""
    layers, path = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        check_layer(layer, f"{path}.{i}")
    info = {"objective": opts.objective, "steps": opts.steps, "blocks": opts.blocks, "layers": []}
    q1s, r2s = [], []
    for i, layer in enumerate(tqdm(layers, desc="rotate", unit="layer", disable=not progress)):
        fold_norms(layer)
        q1, r2, record = learn_rotation(layer, None, "magnitude", pattern, sparsity, opts,
                                        desc=f"rotate {path}.{i}", progress=progress)
        q1s.append(q1)
        r2s.append(r2)
        info["layers"].append(record)
    rotate_model(model, q1s, r2s)
    return info
