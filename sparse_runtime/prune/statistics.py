"""What the calibrated methods measure, and the forward passes that measure it.

The statistics a method accumulates over calibration tokens (Wanda's input norms, SparseGPT's Hessian) and the
runs of one decoder layer that feed linears' inputs into those statistics (the capture of the first decoder
layer's inputs and plain layer runs belong to :mod:`sparse_runtime.models.layer_walk`, re-exported here). The
sequential pruning driver (:mod:`.sequential`), the dense-statistics driver of the searches
(:mod:`.dense_statistics`), the rotation learner and the allocation strategies all collect through these functions."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..errors import ShapeError
from ..models.architecture import INPUTS, UnsupportedModel
from ..models.layer_walk import capture_inputs, forward_session, peak_bytes, run_layer  # noqa: F401  (re-exported)


class Pruned(NamedTuple):
    """What a method did to one linear: its keep mask ``[out, in]`` (None: a dense quantizer prunes nothing) and,
    when the config quantizes, the scales ``[out, groups]`` its weight now sits on the grid of (else None)."""
    keep: torch.Tensor | None
    scales: torch.Tensor | None = None


@dataclass(frozen=True)
class Method:
    """A pruning method as the drivers run it: the statistics it accumulates per distinct linear input
    (``statistics(in_features, device)``, Hessian's also ``first_weight=``, with ``.add(x [..., tokens, in])``;
    None: it needs no calibration), and
    ``prune_linear(linear, stats, pattern, sparsity, config, prior) -> Pruned``, which writes the pruned (and, with
    ``config.quant``, fake-quantized) weight into ``linear`` (pattern and sparsity are the decoder block's: they
    differ under an allocation; ``prior``, the linear's keep mask from ``config.prior`` or None, what stays
    pruned)."""
    name: str
    statistics: type | None
    prune_linear: Callable[[nn.Linear, object, str, float, object, torch.Tensor | None], Pruned]


class InputNorms:
    """Running sum over tokens of x_j^2 for each input column j (fp32)."""

    def __init__(self, in_features: int, device):
        self.sq = torch.zeros(in_features, device=device, dtype=torch.float32)

    def add(self, x: torch.Tensor) -> None:
        self.sq += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)


class Hessian:
    """H = (2/n) sum_t c_t x_t x_t^T over the calibration tokens seen so far (n = sum_t c_t), in fp32. Every token
    counts c_t = 1, except that with ``first_weight`` the first token of each window (``x`` given as
    ``[windows, tokens, in]``) counts that many times: the weighting of a key or value projection, whose output for
    that token, the attention sink, every later query of the window reads (``PruneConfig.sink_weight``)."""

    def __init__(self, in_features: int, device, first_weight: float = 1.0):
        self.H = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.n = 0.0
        self.first_weight = first_weight

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.first_weight != 1:
            if x.dim() != 3:
                raise ShapeError(f"a first-token weight needs inputs as windows [windows, tokens, in], got "
                                 f"{tuple(x.shape)}")
            c = torch.ones(x.shape[1], device=x.device)
            c[0] = self.first_weight
            x = x * c.sqrt()[:, None]
            t = x.shape[0] * float(c.sum())
        else:
            t = x.numel() // x.shape[-1]
        x = x.reshape(-1, x.shape[-1])
        self.H *= self.n / (self.n + t)
        self.n += t
        x = x * (2 / self.n) ** 0.5
        self.H.addmm_(x.T, x)


class _Tapped(Exception):
    """Raised once every tapped linear has seen its input: the rest of the layer's forward is not needed."""


def run_collecting(layer, taps: dict, inps, kwargs, device, store=None) -> list:
    """:func:`run_layer` with each tapped linear's inputs added to its statistics (``taps``: {module: stats}).
    Without ``store`` (no outputs wanted) each forward stops as soon as every tapped linear has been reached:
    a true-sequential prune's statistics for q/k/v need only the norm, not the whole layer."""
    seen = set()

    def hook(mod, a, s):
        s.add(a[0])
        seen.add(mod)
        if store is None and len(seen) == len(taps):
            raise _Tapped

    handles = [m.register_forward_pre_hook(lambda mod, a, s=s: hook(mod, a, s)) for m, s in taps.items()]
    try:
        if store is not None:
            return run_layer(layer, inps, kwargs, device, store)
        for x in inps:
            seen.clear()
            try:
                run_layer(layer, [x], kwargs, device)
            except _Tapped:
                pass
        return []
    finally:
        for h in handles:
            h.remove()


def input_groups(layer, names: dict[str, nn.Linear], x, kwargs, device) -> list[list[str]]:
    """Linears grouped by the input tensor they share, in execution order: for Llama-like layers
    [q,k,v], [o], [gate,up], [down]. Sharing one input means sharing one set of statistics."""
    seen: list[tuple[torch.Tensor, list[str]]] = []  # holding the inputs stops their memory being reused

    def hook(mod, a, out, n):
        for t, group in seen:
            if t is a[0]:
                return group.append(n)
        seen.append((a[0], [n]))

    handles = [m.register_forward_hook(lambda mod, a, out, n=n: hook(mod, a, out, n)) for n, m in names.items()]
    try:
        run_layer(layer, [x], kwargs, device)
    finally:
        for h in handles:
            h.remove()
    groups = [g for _, g in seen]
    missing = set(names) - {n for g in groups for n in g}
    if missing:
        raise UnsupportedModel(f"linears {sorted(missing)} were not called in a forward of their decoder layer")
    return groups


def collect_dense(layer, names, new_stats, inps, kwargs, device, store, into: dict) -> list:
    """One forward of the unpruned layer: its outputs, and each linear's statistics into ``into`` (linears that
    share an input share one statistics object)."""
    if not names:
        return run_layer(layer, inps, kwargs, device, store)
    groups = input_groups(layer, names, inps[0], kwargs, device)
    stats = {g[0]: new_stats(names[g[0]].in_features, device) for g in groups}
    outs = run_collecting(layer, {names[k]: st for k, st in stats.items()}, inps, kwargs, device, store)
    into.update({n: stats[g[0]] for g in groups for n in g})
    return outs


@dataclass
class LayerInputs:
    """Second moments ``H = (2/n) X X^T`` of the four distinct linear inputs of a decoder layer."""
    attn: torch.Tensor  # [d, d], read by q, k, v
    o: torch.Tensor  # [heads * hd, heads * hd]
    mlp: torch.Tensor  # [d, d], read by gate, up
    down: torch.Tensor  # [I, I]


def layer_inputs(layer, inps, kwargs, device):
    """The four input Hessians a rotation is learned on, from one pass of the dense layer."""
    taps = {k: layer.get_submodule(path) for k, path in INPUTS.items()}
    stats = {k: Hessian(m.in_features, device) for k, m in taps.items()}
    run_collecting(layer, {m: stats[k] for k, m in taps.items()}, inps, kwargs, device)
    return LayerInputs(**{k: s.H for k, s in stats.items()})
