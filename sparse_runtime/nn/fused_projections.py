"""Projections that read one input, run as one call: attention's q/k/v and the MLP's gate/up.

At decode a small model is many small matrices, and each call has costs the kernel's bytes do not explain
(dispatch, a thread fork, the first misses of a new weight); SmolLM2 makes seven per decoder layer.
:func:`fuse_projections` concatenates the rows of each group's compressed weights once (2:4 rows are independent,
so the concatenation is the canonical format of the stacked weight) and makes the members' tensors views of it:
one copy in memory, the state dict unchanged. The first member called computes every member's output; the others
take their slices when called with the same input tensor, as HF's attention and MLP modules call them, and compute
again otherwise (correct either way). A member that is moved, reloaded or given another rotation or backend leaves
its group and computes alone again."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BackendUnavailable
from ..format.codec import SparseWeight, parse_pattern
from ..models.architecture import ATTN_READERS, MLP_READERS
from .linear import SparseLinear

SHARED_INPUTS = (ATTN_READERS, MLP_READERS)  # the linears of a decoder layer that read one tensor


class FusedProjections:
    """One :class:`SparseLinear` over the members' rows, and the outputs of the call in flight.

    A plain object, not a module: the members own the state (views into :attr:`linear`'s tensors), and a module
    here would put every weight in the state dict twice."""

    def __init__(self, members: list[SparseLinear]):
        first = members[0]
        sw = SparseWeight(first.pattern, (sum(m.out_features for m in members), first.in_features),
                          torch.cat([m.weight_values for m in members]), torch.cat([m.weight_meta for m in members]),
                          None if first.quant is None else torch.cat([m.weight_scales for m in members]), first.quant)
        bias = None if first.bias is None else torch.cat([m.bias.detach() for m in members])
        self.linear = SparseLinear.from_sparse_weight(sw, bias, backend=first.backend)
        if first.rotation is not None:
            self.linear.set_rotation(first.rotation)
        self.linear._resolve()  # a backend that refuses the stacked shape refuses here, before any member changes
        self.sizes = tuple(m.out_features for m in members)
        self._call = None  # (input, outputs): read and written whole, so a racing caller never mixes two calls
        self._left = 0  # bit i: member i has not taken its output of _call yet

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor:
        call = self._call
        if call is None or call[0] is not x:
            call = self._call = (x, self.linear(x).split(self.sizes, dim=-1))
            self._left = (1 << len(self.sizes)) - 1
        self._left &= ~(1 << index)
        if not self._left:  # every member served: hold no activations between calls
            self._call = None
        return call[1][index]


def fusible(members: list[nn.Module]) -> str | None:
    """Why ``members`` cannot run as one call, or None."""
    if not all(isinstance(m, SparseLinear) for m in members):
        return "not all SparseLinear"
    first = members[0]
    if parse_pattern(first.pattern) is None:
        return f"pattern {first.pattern} has no fixed values per row"
    for m in members[1:]:
        for what in ("in_features", "pattern", "quant", "dtype", "backend"):
            if getattr(m, what) != getattr(first, what):
                return f"{what} differs: {getattr(first, what)} and {getattr(m, what)}"
        if m.weight_values.device != first.weight_values.device:
            return "devices differ"
        if (m.bias is None) != (first.bias is None):
            return "some have a bias, some not"
        if (m.rotation is None) != (first.rotation is None) or (
                m.rotation is not None and not torch.equal(m.rotation, first.rotation)):
            return "rotations differ"
    return None


def fuse(members: list[SparseLinear]) -> FusedProjections:
    """Run ``members`` (:func:`fusible`, each called on the same input) as one call; their tensors become views."""
    why = fusible(members)
    if why:
        raise ValueError(f"cannot fuse these projections: {why}")
    group = FusedProjections(members)
    fused, start = group.linear, 0
    for index, m in enumerate(members):
        rows = slice(start, start + m.out_features)
        m.weight_values = fused.weight_values[rows]
        m.weight_meta = fused.weight_meta[rows]
        if m.quant is not None:
            m.weight_scales = fused.weight_scales[rows]
        if m.bias is not None:
            m.bias = nn.Parameter(fused.bias.detach()[rows], requires_grad=m.bias.requires_grad)
        m._runner, m._fused = None, (group, index)
        start += m.out_features
    return group


def fuse_projections(model: nn.Module) -> int:
    """Fuse each decoder layer's q/k/v and gate/up SparseLinears (:data:`SHARED_INPUTS`) where they are
    :func:`fusible` and their backend runs the stacked weight; the number of groups fused. Fuse after moving the
    model: a move unfuses."""
    fused = 0
    for layer in list(model.modules()):
        for paths in SHARED_INPUTS:
            members = [_submodule(layer, p) for p in paths]
            if None in members or any(getattr(m, "_fused", None) for m in members) or fusible(members):
                continue
            try:
                fuse(members)
            except BackendUnavailable:  # the members still run alone
                continue
            fused += 1
    return fused


def _submodule(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None
