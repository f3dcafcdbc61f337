"""Which tensors of a sparse model a recovery run trains, and the model's state while it does.

The masks stay frozen by construction: a :class:`~sparse_runtime.nn.linear.SparseLinear`'s kept values
(``weight_values``) become the trained parameter and its ``weight_meta`` is never touched, so no pruned weight can
move. Its forward runs on the ``reference`` backend, which decompresses the values into the dense weight on every
call (a scatter autograd differentiates), so gradients reach exactly the kept entries. Norms and biases train too;
the input embedding and the output head stay as they are (a rotated model's boundary rotations, buffers, are
fixed alike)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..nn.linear import SparseLinear

VALUES = "weight_values"


def trainable_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """The SparseLinears whose kept values a recovery run trains, or a clear error for a model it cannot train."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SparseLinear layer: recovery fine-tunes a sparse checkpoint")
    quantized = [n for n, m in layers.items() if m.quant is not None]
    if quantized:  # codes have no gradient; training them would need a quantization-aware step
        scheme = layers[quantized[0]].quant.name
        raise ValueError(f"{len(quantized)} layers (the first: {quantized[0]}) hold {scheme} codes: recovery trains "
                         "float values, so recover the checkpoint pruned without --quantize")
    return layers


@contextmanager
def training_form(model: nn.Module):
    """Inside: every floating tensor in float32 (the optimizer's master copy), each SparseLinear's values a
    parameter on the ``reference`` backend, and the trainable parameters (:func:`trainable`) requiring grad. On
    exit (also on an error) the values are buffers again, each tensor is back in its stored dtype and each layer
    on its backend."""
    layers = trainable_layers(model)
    dtypes = {k: t.dtype for k, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}
    backends = {n: m.backend for n, m in layers.items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.float()
    for layer in layers.values():
        values = layer._buffers.pop(VALUES)
        setattr(layer, VALUES, nn.Parameter(values))
        layer.set_backend("reference")
    frozen = _frozen(model)
    for p in model.parameters():
        p.requires_grad_(not any(p is f for f in frozen))
    try:
        yield
    finally:
        for layer in layers.values():
            values = layer._parameters.pop(VALUES).detach()
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
