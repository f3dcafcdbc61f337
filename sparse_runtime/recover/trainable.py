"""Which tensors of a sparse model a recovery run trains, and the model's state while it does.

The masks stay frozen by construction: a :class:`~sparse_runtime.nn.linear.SparseLinear`'s kept values
(``weight_values``) become the trained parameter and its ``weight_meta`` is never touched, so no pruned weight can
move. Its forward runs on the ``reference`` backend, which decompresses the values into the dense weight on every
call (a scatter autograd differentiates), so gradients reach exactly the kept entries. Norms and biases train too;
the input embedding and the output head only when asked (a rotated model's boundary rotations, buffers, stay fixed).

A quantized layer trains quantization-aware, in units of its grid: the trained tensor is its codes as floats
(:data:`CODES`, learning rate ``code_lr``: a step moves an int4 and an int8 code alike relative to its grid, where
one learning rate in weight units would hardly move a coarse int4 code), the forward rounds them to the scheme's
grid and multiplies by the layer's fixed scales, and the gradient passes the rounding straight through (none to a
code clipped past the grid's ends); on exit the rounded codes are stored, so the layer holds codes of its scheme
again, masks and scales unchanged."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..format.quant import dequantize_codes, quantize_codes, store_codes, stored_codes
from ..nn.linear import SparseLinear

VALUES = "weight_values"
CODES = f"parametrizations.{VALUES}.original"  # a quantized layer's trained tensor (its codes as floats), by name


def trainable_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """The SparseLinears whose kept values a recovery run trains, or a clear error for a model it cannot train."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SparseLinear layer: recovery fine-tunes a sparse checkpoint")
    return layers


class OnGrid(nn.Module):
    """A parametrization of a quantized layer's values by its codes as floats: the codes rounded to ``scheme``'s
    grid (the rounding passed straight through in the backward; a code clipped past the grid's ends gets no
    gradient), times ``scales``."""

    def __init__(self, scales: torch.Tensor, scheme):
        super().__init__()
        self.scheme = scheme
        self.register_buffer("scales", scales, persistent=False)  # follow the model's moves
        self.register_buffer("units", torch.ones_like(scales), persistent=False)

    def rounded(self, codes: torch.Tensor) -> torch.Tensor:
        """The codes on the grid, in their code dtype (quant's rounding, with unit scales)."""
        return quantize_codes(codes, self.units, self.scheme)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        clipped = codes.clamp(-self.scheme.qmax, self.scheme.qmax)
        return dequantize_codes(clipped + (self.rounded(codes).to(codes.dtype) - clipped).detach(), self.scales)


@contextmanager
def training_form(model: nn.Module, embeddings: bool = False):
    """Inside: every floating tensor in float32 (the optimizer's master copy), each SparseLinear's values a
    parameter on the ``reference`` backend (a quantized layer's fake-quantized, see the module docstring), and the
    trainable parameters (:func:`trainable`: the input embedding and output head too with ``embeddings``) requiring
    grad. On exit (also on an error) the values are buffers again (codes for a quantized layer), each tensor is
    back in its stored dtype and each layer on its backend."""
    layers = trainable_layers(model)
    dtypes = {k: t.dtype for k, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}
    backends = {n: m.backend for n, m in layers.items()}
    schemes = {n: m.quant for n, m in layers.items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.float()
    for layer in layers.values():
        values = layer._buffers.pop(VALUES)
        scheme = layer.quant
        if scheme is not None:  # its codes as floats; quant=None: the layer reads the parametrized values as values
            values, layer.quant = stored_codes(values, scheme).float(), None
        setattr(layer, VALUES, nn.Parameter(values))
        if scheme is not None:
            parametrize.register_parametrization(layer, VALUES, OnGrid(layer.weight_scales, scheme))
        layer.set_backend("reference")
    frozen = [] if embeddings else _frozen(model)
    for p in model.parameters():
        p.requires_grad_(not any(p is f for f in frozen))
    try:
        yield
    finally:
        for n, layer in layers.items():
            grid = layer.parametrizations[VALUES][0] if schemes[n] is not None else None
            if grid is not None:
                parametrize.remove_parametrizations(layer, VALUES, leave_parametrized=False)
            values = layer._parameters.pop(VALUES).detach()
            if grid is not None:
                values, layer.quant = store_codes(grid.rounded(values), schemes[n]), schemes[n]
            layer.register_buffer(VALUES, values)
        for k, t in model.state_dict(keep_vars=True).items():
            if k in dtypes and t.dtype != dtypes[k]:
                t.data = t.data.to(dtypes[k])
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))
            p.grad = None
        for n, layer in layers.items():
            layer.set_backend(backends[n])


def _frozen(model: nn.Module) -> list[torch.Tensor]:
    ends = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [p for m in ends if m is not None for p in m.parameters()]


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of what trains in ``module`` (the whole model, or one decoder layer), in a fixed order
    (the optimizer's state and a saved state follow it)."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
