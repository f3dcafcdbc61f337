"""Walking a decoder model one layer at a time: capture the hidden states entering its first decoder layer (and the
keyword arguments each layer is called with), then run single layers on them. The layer-wise pruning driver and
block-wise recovery both walk a model this way, holding one decoder layer on the compute device at a time."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .architecture import UnsupportedModel


class _Captured(Exception):
    """Raised by the hook on layer 0 to stop the forward once its inputs are saved."""


def _move_outside(model: nn.Module, path: str, device) -> None:
    """Move every parameter and buffer that is not inside the decoder layers (embeddings, rotary, norms)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(path + "."):
            t.data = t.data.to(device)


def capture_inputs(model, layers, path, calib: torch.Tensor, device, store) -> tuple[list, list[dict]]:
    """Hidden states entering layer 0 for each window (kept on ``store``), and for each layer the keyword
    arguments the installed transformers passes it (position_embeddings, attention_mask, ...; they can
    differ per layer, e.g. sliding-window masks). Every layer is swapped for a pass-through stub, so no
    decoder layer computes or leaves its device; the first window walks all stubs, the rest stop at layer 0."""
    inps, kwargs = [], [None] * len(layers)
    drop = ("hidden_states", "past_key_value", "past_key_values", "use_cache")

    def stub(i):
        def forward(*args, **kw):
            hidden = args[0] if args else kw["hidden_states"]
            if i == 0:
                inps.append(hidden.to(store))
            if kwargs[i] is None:
                kwargs[i] = {k: v for k, v in kw.items() if k not in drop}
            if i == len(layers) - 1 or kwargs[-1] is not None:
                raise _Captured
            return hidden
        return forward

    home = next(model.parameters()).device
    _move_outside(model, path, device)
    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    try:
        for j in range(calib.shape[0]):
            try:
                model(input_ids=calib[j:j + 1].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        for layer in layers:
            del layer.forward
        _move_outside(model, path, home)
    if len(inps) != calib.shape[0] or kwargs[-1] is None:
        raise UnsupportedModel(f"{type(model).__name__}: the forward pass did not call every decoder layer")
    return inps, kwargs


@contextmanager
def forward_session(model, device) -> Iterator[None]:
    """The model's KV cache off while its layers are run on calibration windows (restored after), and the
    device's peak-memory counter reset for :func:`peak_bytes`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if config is not None:
            config.use_cache = use_cache


def peak_bytes(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_layer(layer, inps, kwargs, device, store=None) -> list:
    outs = []
    for x in inps:
        y = layer(x.to(device), **kwargs)
        y = y[0] if isinstance(y, (tuple, list)) else y  # older transformers return a tuple
        if store is not None:
            outs.append(y.to(store))
    return outs
