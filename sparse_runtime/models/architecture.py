"""What a decoder-only transformer looks like to this project: where its decoder layers are and which of
its linears a sparsity pattern applies to. One owner for the runtime (checkpoints, rotations, sparsify)
and the pruning front-end alike."""
from __future__ import annotations

import fnmatch
import math

from torch import nn

from ..errors import ShapeError, SparseRuntimeError
from ..format.codec import parse_pattern
from ..format.quant import QuantScheme

# where transformers families keep their decoder layers
LAYER_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers", "transformer.h",
               "gpt_neox.layers", "layers")

# The linears of a Llama-style decoder layer (Llama, Qwen2/3, Mistral, Gemma), by their paths in the layer:
# those that read the residual stream (attention's, then the MLP's) and those that write it.
ATTN_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")
READERS = ATTN_READERS + MLP_READERS
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
# the projections whose output for a token every later query of its window reads: keys and values
KEY_VALUE = ATTN_READERS[1:]
# the layer's distinct linear inputs, each by the first linear that reads it (q, k, v share one; gate, up another)
INPUTS = {"attn": ATTN_READERS[0], "o": WRITERS[0], "mlp": MLP_READERS[0], "down": WRITERS[1]}


class UnsupportedModel(SparseRuntimeError, TypeError):
    """The model has no decoder-layer stack the layerwise driver can walk."""


def matches(name: str, patterns) -> bool:
    """A pattern matches a module name by glob, or as its last dotted component(s)."""
    return any(fnmatch.fnmatchcase(name, p) or name == p or name.endswith("." + p) for p in patterns)


def select_linears(model: nn.Module, pattern: str, targets=None, ignore=("lm_head",), within: str | None = None,
                   keep=(), explicit: bool | None = None,
                   quant: QuantScheme | None = None) -> tuple[dict[str, nn.Linear], list[tuple[str, str]]]:
    """``({name: nn.Linear}, [(name, reason)])``: the linears ``pattern`` applies to, and those passed over.

    ``targets`` (globs or trailing name components; default every ``nn.Linear``, or those under ``within.``)
    minus ``ignore`` (names in ``keep`` are never ignored). A linear whose in_features the pattern (or the
    groups of a grouped ``quant`` scheme) cannot group is skipped with the reason, or raises
    :class:`ShapeError` when the caller chose layers explicitly (default: when ``targets`` is given)."""
    group = parse_pattern(pattern)
    m = group[1] if group else 1
    grouping = pattern
    if quant is not None and quant.group_size:
        m, grouping = math.lcm(m, quant.group_size), f"{pattern}, {quant.name} groups of {quant.group_size}"
    explicit = targets is not None if explicit is None else explicit
    chosen, skipped = {}, []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if targets is None and within is not None and not name.startswith(within + "."):
            continue
        if targets is not None and not matches(name, targets):
            continue
        if matches(name, ignore) and name not in keep:
            skipped.append((name, "ignored"))
            continue
        if mod.in_features % m:
            why = f"in_features={mod.in_features} is not divisible by {m} ({grouping})"
            if explicit:
                raise ShapeError(f"{name}: {why}")
            skipped.append((name, why))
            continue
        chosen[name] = mod
    return chosen, skipped


def find_decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder-layer stack and its dotted path, found by the names transformers families use."""
    for path in LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers, path
    raise UnsupportedModel(f"{type(model).__name__}: no decoder layers found (looked for an nn.ModuleList at "
                           f"{', '.join(LAYER_PATHS)}); layer-by-layer pruning supports decoder-only "
                           "transformers such as Llama, Qwen2, Mistral and Gemma")


def decoder_linears(model: nn.Module, pattern: str, targets=None, ignore=("lm_head",)):
    """``({name: nn.Linear}, [(name, reason)])``: the linears to prune and those skipped.

    Default targets are every ``nn.Linear`` inside the decoder layers; one the
    pattern cannot group is skipped with the reason. A layer named by
    ``targets`` (globs or trailing name components, as :func:`sparsify`) that
    cannot be grouped raises :class:`ShapeError`."""
    _, path = find_decoder_layers(model)
    chosen, skipped = select_linears(model, pattern, targets, ignore, within=path)
    if not chosen:
        raise ValueError(f"no linear layer to prune for pattern {pattern} (skipped: {skipped or 'none found'})")
    return chosen, skipped
