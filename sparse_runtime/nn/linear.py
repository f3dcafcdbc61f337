"""``SparseLinear``: a drop-in for ``nn.Linear`` holding its weight in the canonical compressed format."""
from __future__ import annotations

import torch
from torch import nn

from .. import backends
from ..errors import ShapeError
from ..format.codec import (FLOAT_DTYPES, SparseWeight, check_weight, expected_shapes, is_24, parse_pattern,
                            unsupported_dtype)
from ..format.masks import pattern_mask
from ..format.quant import QuantScheme, encode
from ..format.rotation import check_rotation


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` (optionally ``(x @ R) @ W^T + b``) with ``W`` sparse.

    Persistent state (``state_dict``): ``weight_values`` and ``weight_meta`` in
    the canonical format (see :mod:`sparse_runtime.format.codec`), ``bias``, and an
    optional ``rotation``. Backend layouts are derived from them on first use
    and again after every device or dtype move; they are never saved.

    Quantized (``quant``, a :class:`~sparse_runtime.format.quant.QuantScheme`): ``weight_values`` holds the
    codes and ``weight_scales`` their scales; the layer computes in the scales' dtype (:attr:`dtype`), and a
    dtype move converts the scales, never the codes. The scheme is not in the state dict: a layer loads the
    state of one built with the same scheme.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        pattern: str = "2:4",
        nnz: int | None = None,
        backend: str = "auto",
        device=None,
        dtype=None,
        quant: QuantScheme | None = None,
    ):
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        why = unsupported_dtype(dtype, FLOAT_DTYPES)
        if why:
            raise TypeError(f"SparseLinear: {why}")
        self.in_features, self.out_features, self.pattern = in_features, out_features, pattern
        if parse_pattern(pattern) is None and nnz is None:
            nnz = in_features * out_features // 2
        shape = (out_features, in_features)
        shapes = expected_shapes(pattern, shape, nnz=nnz, quant=quant)
        values = torch.zeros(expected_shapes(pattern, shape, nnz=nnz)["values"], device=device, dtype=dtype)
        scales = None if quant is None else torch.ones(shapes["scales"], device=device, dtype=dtype)
        self.quant = quant
        self.register_buffer("weight_values", values if quant is None else encode(values, scales, quant))
        self.register_buffer("weight_scales", scales)
        self.register_buffer("weight_meta", torch.zeros(shapes["meta"], device=device, dtype=torch.uint8))
        if is_24(pattern):  # a valid all-zero weight: indices (0, 1) in every group
            self.weight_meta.fill_(0x44)
            if in_features % 8:
                self.weight_meta[:, -1] = 0x04
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("rotation", None)
        self.backend = backend
        self._runner = None  # (backend, state, weight dtype, weight device), rebuilt lazily
        self._fused = None  # (FusedProjections, index): run with siblings that read the same input (fused_projections)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        mask: torch.Tensor | None = None,
        backend: str = "auto",
        pattern: str = "2:4",
        sparsity: float = 0.5,
        name: str = "linear",
        quant: QuantScheme | None = None,
        scales: torch.Tensor | None = None,
    ) -> "SparseLinear":
        """Compress ``linear`` under ``mask`` (default: magnitude mask for ``pattern``); with ``quant``, its kept
        values quantized under ``scales`` ([out, groups] in the weight's dtype; default: absmax of the kept
        entries). A weight already fake-quantized under ``scales`` keeps its values exactly."""
        weight = linear.weight.detach()
        check_weight(weight, name)
        nm = parse_pattern(pattern)
        if nm and weight.shape[1] % nm[1]:
            raise ShapeError(f"{name}: in_features={weight.shape[1]} is not divisible by the group size "
                             f"{nm[1]} of pattern {pattern}")
        if mask is None:
            mask = pattern_mask(weight.abs(), pattern, sparsity)
        sw = SparseWeight.compress(weight, mask, pattern, name=name, quant=quant, scales=scales)
        layer = cls.from_sparse_weight(sw, linear.bias, backend=backend)
        layer._resolve()  # fail now, not at the first forward, if the backend cannot run it
        return layer

    @classmethod
    def from_sparse_weight(cls, sw: SparseWeight, bias: torch.Tensor | None = None, backend: str = "auto"):
        rows, k = sw.shape
        layer = cls(k, rows, bias=bias is not None, pattern=sw.pattern, nnz=sw.nnz, backend=backend,
                    device=sw.values.device, dtype=sw.dtype, quant=sw.quant)
        layer.weight_values.copy_(sw.values)
        layer.weight_meta.copy_(sw.meta)
        if sw.quant is not None:
            layer.weight_scales.copy_(sw.scales)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    # -- views of the weight ------------------------------------------------------------------------
    @property
    def sparse_weight(self) -> SparseWeight:
        return SparseWeight(self.pattern, (self.out_features, self.in_features), self.weight_values, self.weight_meta,
                            self.weight_scales, self.quant)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layer computes in (its inputs' dtype): the values', or the scales' when quantized."""
        return self.weight_values.dtype if self.quant is None else self.weight_scales.dtype

    def dense_weight(self) -> torch.Tensor:
        """The decompressed ``[out_features, in_features]`` weight (zeros where pruned)."""
        return self.sparse_weight.to_dense()

    @property
    def weight(self) -> torch.Tensor:
        # Code written for nn.Linear reads .weight (dtype, device, shape); give it the dense view.
        return self.dense_weight()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.sparse_weight.nnz / (self.in_features * self.out_features)

    def nbytes(self) -> int:
        extra = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.sparse_weight.nbytes() + extra

    def set_rotation(self, rotation: torch.Tensor | None) -> None:
        """Put an orthogonal ``R`` ([K, K] or blocks [K/b, b, b]) in front: ``y = (x @ R) @ W^T + b``."""
        if rotation is not None:
            check_rotation(rotation, self.in_features)
            rotation = rotation.to(device=self.weight_values.device, dtype=self.dtype)
        self.rotation = rotation
        self._runner = self._fused = None

    def set_backend(self, backend: str) -> None:
        self.backend = backend
        self._runner = self._fused = None
        self._resolve()

    def describe(self) -> str:
        quant = "" if self.quant is None else f", {self.quant.name} values"
        return (f"SparseLinear({self.in_features}->{self.out_features}, {self.pattern}{quant}, "
                f"{self.dtype}, {self.weight_values.device})")

    # -- execution ----------------------------------------------------------------------------------
    def _resolve(self):
        if self._runner is None:
            backend = backends.resolve(self.backend, self)
            self._runner = (backend, backend.prepare(self), self.dtype, self.weight_values.device)
        return self._runner

    @property
    def active_backend(self) -> str:
        return self._resolve()[0].name

    def _apply(self, fn, *args, **kwargs):
        # A device or dtype move invalidates every derived layout, and leaves the fused group (its views would
        # be copies now).
        self._runner = self._fused = None
        codes = None if self.quant is None else self.quant.code_dtype
        if codes is None or not codes.is_floating_point:
            return super()._apply(fn, *args, **kwargs)
        # fp8 codes are floating to torch, so a dtype move would convert them; as bytes they only change device
        self._buffers["weight_values"] = self.weight_values.view(torch.uint8)
        try:
            return super()._apply(fn, *args, **kwargs)
        finally:
            self._buffers["weight_values"] = self.weight_values.view(codes)

    def _load_from_state_dict(self, *args, **kwargs):
        self._runner = self._fused = None  # assign=True would replace the views
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            group, index = self._fused
            return group.take(index, x)
        # one check against what the runner was built for: decode calls this per token per linear
        backend, state, dtype, device = self._runner or self._resolve()
        if x.shape[-1] != self.in_features or x.dtype != dtype or x.device != device:
            if x.shape[-1] != self.in_features or x.device != device or not torch.is_autocast_enabled(device.type):
                self._refuse(x)
            if not backend.autocasts:  # x came in autocast's dtype: this backend computes in the layer's
                x = x.to(dtype)
        return backend.forward(self, state, x)

    def _refuse(self, x: torch.Tensor):
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"{self.describe()}: input has last dimension {x.shape[-1]}, expected {self.in_features}")
        if x.dtype != self.dtype:
            raise TypeError(f"{self.describe()}: input dtype {x.dtype} does not match weight dtype {self.dtype}")
        raise RuntimeError(f"{self.describe()}: input is on {x.device}, weights on {self.weight_values.device}")

    def extra_repr(self) -> str:
        rot = "" if self.rotation is None else f", rotation={list(self.rotation.shape)}"
        quant = "" if self.quant is None else f", quant={self.quant.name}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"pattern={self.pattern}{quant}, backend={self.backend}{rot}")
