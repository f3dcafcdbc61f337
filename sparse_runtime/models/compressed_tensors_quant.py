"""The quantization side of compressed-tensors configs: which ``config_groups`` sparse_runtime takes, as which
:class:`~sparse_runtime.format.quant.QuantScheme`, which group a layer belongs to, and the groups an export
writes. Both directions go through :data:`_SCHEMES`, so what loads and what is written are one table.

Taken (weights symmetric, static, no activation ordering):
  * ``marlin-24``: int, 4 or 8 bits, ``group`` of 128 or ``channel`` -> ``int4`` / ``int8`` with
    ``group_size`` 128 or per row;
  * ``float-quantized`` (or ``naive-quantized``, what compressed-tensors names weight-only fp8), over
    ``sparse-24-bitmask``: float, 8 bits, ``channel`` (or ``tensor``, one scale repeated per row) -> ``fp8`` per row.
Activation quantization is not applied: sparse_runtime runs weight-only, so a group that quantizes its
inputs dynamically (``FP8_DYNAMIC``'s per-token fp8) loads with a warning saying so, and static input or
output quantization, a KV-cache scheme and transforms are refused.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from torch import nn

from ..errors import CheckpointError
from ..format.quant import QuantScheme
from .marlin24 import GROUP_SIZE as _MARLIN_GROUP

MARLIN24 = "marlin-24"
FLOAT_QUANTIZED = "float-quantized"
NAIVE_QUANTIZED = "naive-quantized"
BITMASK_FORMATS = (FLOAT_QUANTIZED, NAIVE_QUANTIZED)  # quantized codes stored in sparse-24-bitmask's tensors
MIXED = "mixed-precision"
# (format, CT type, num_bits, CT strategy, group_size) <-> our scheme
_SCHEMES = {
    (MARLIN24, "int", 4, "group", _MARLIN_GROUP): QuantScheme("int4", _MARLIN_GROUP),
    (MARLIN24, "int", 4, "channel", None): QuantScheme("int4", None),
    (MARLIN24, "int", 8, "group", _MARLIN_GROUP): QuantScheme("int8", _MARLIN_GROUP),
    (MARLIN24, "int", 8, "channel", None): QuantScheme("int8", None),
    (FLOAT_QUANTIZED, "float", 8, "channel", None): QuantScheme("fp8", None),
    (FLOAT_QUANTIZED, "float", 8, "tensor", None): QuantScheme("fp8", None),  # loaded as one scale per row
    (NAIVE_QUANTIZED, "float", 8, "channel", None): QuantScheme("fp8", None),
    (NAIVE_QUANTIZED, "float", 8, "tensor", None): QuantScheme("fp8", None),
}
_WRITTEN = {scheme: key for key, scheme in reversed(list(_SCHEMES.items()))}  # fp8: the first, float-quantized channel


@dataclass(frozen=True)
class Group:
    """One config group: its name, storage format, targets and the scheme of its weights."""
    name: str
    format: str
    targets: tuple[str, ...]
    quant: QuantScheme


def _strategy(w: dict) -> str:
    """A weights entry's strategy, inferred from its group size when absent (as compressed-tensors does)."""
    if w.get("strategy"):
        return str(w["strategy"]).lower()
    size = w.get("group_size")
    return "tensor" if size is None else "channel" if size == -1 else "group"


def _group(qc: dict, name: str, g, where) -> Group:
    at = f"{where}: compressed-tensors config group {name!r}"
    if not isinstance(g, dict):
        raise CheckpointError(f"{at} names a preset ({g!r}); sparse_runtime reads expanded schemes only")
    fmt = g.get("format") or qc.get("format")
    if fmt not in {f for f, *_ in _SCHEMES}:
        raise CheckpointError(f"{at}: format {fmt} is not supported: sparse_runtime loads {MARLIN24}, and fp8 "
                              f"({', '.join(BITMASK_FORMATS)}) over sparse-24-bitmask")
    w = g.get("weights")
    if not isinstance(w, dict):
        raise CheckpointError(f"{at} quantizes no weights; sparse_runtime takes weight quantization only")
    if w.get("symmetric", True) is not True:
        raise CheckpointError(f"{at}: asymmetric weights (symmetric=false) are not supported: zero points are not")
    if w.get("actorder"):
        raise CheckpointError(f"{at}: actorder={w['actorder']!r} (activation-ordered groups, g_idx) is not supported")
    if w.get("dynamic"):
        raise CheckpointError(f"{at}: dynamic weight quantization is not supported")
    strategy, size = _strategy(w), w.get("group_size")
    key = (fmt, str(w.get("type", "int")).lower(), w.get("num_bits", 8), strategy,
           size if strategy == "group" else None)
    if key not in _SCHEMES:
        taken = "; ".join(f"{t} {b}-bit {s}" + (f" {n}" if n else "") for f, t, b, s, n in _SCHEMES if f == fmt)
        raise CheckpointError(f"{at}: {key[1]} {key[2]}-bit {strategy}"
                              f"{f' group_size={size}' if strategy == 'group' else ''} weights are not supported "
                              f"in {fmt}; supported: {taken}")
    if g.get("output_activations"):
        raise CheckpointError(f"{at}: output activation quantization is not supported (sparse_runtime runs "
                              "weight-only)")
    acts = g.get("input_activations")
    if acts and not acts.get("dynamic"):
        raise CheckpointError(f"{at}: static input activation quantization (input_scale) is not supported "
                              "(sparse_runtime runs weight-only)")
    if acts:
        warnings.warn(f"{at} quantizes its input activations dynamically ({acts.get('type', 'int')} "
                      f"{acts.get('num_bits', 8)}-bit, per {acts.get('strategy', 'token')}); sparse_runtime runs "
                      f"weight-only and does not apply it", stacklevel=4)
    return Group(name, fmt, tuple(g.get("targets") or ()), _SCHEMES[key])


def parse_groups(qc: dict, where) -> list[Group]:
    """The config's quantization groups, each validated (a clear error for anything not taken)."""
    if qc.get("kv_cache_scheme"):
        raise CheckpointError(f"{where}: a compressed-tensors kv_cache_scheme is not supported")
    if qc.get("transform_config"):
        raise CheckpointError(f"{where}: compressed-tensors transforms (transform_config) are not supported")
    return [_group(qc, name, g, where) for name, g in (qc.get("config_groups") or {}).items()]


def _matches(name: str, module: nn.Module, targets) -> bool:
    """compressed-tensors' target rule: the module's name, ``re:`` + a regex matched at its start, or the name of
    one of its classes."""
    classes = {c.__name__ for c in type(module).__mro__}
    return any(t == name or t in classes or (t.startswith("re:") and re.match(t[3:], name)) for t in targets)


def group_of(groups: list[Group], ignore, name: str, module: nn.Module, where) -> Group | None:
    """The group that quantizes layer ``name``, or None."""
    if _matches(name, module, ignore or ()):
        return None
    hits = [g for g in groups if _matches(name, module, g.targets)]
    if len(hits) > 1:
        raise CheckpointError(f"{where}: layer {name} is targeted by several config groups "
                              f"({', '.join(g.name for g in hits)})")
    return hits[0] if hits else None


def export_format(quant: QuantScheme) -> str | None:
    """The compressed-tensors format a scheme is written in, or None when none takes it."""
    key = _WRITTEN.get(quant)
    return None if key is None else key[0]


def config_groups(layers: dict[str, QuantScheme]) -> dict:
    """The quantization part of an export's ``quantization_config``: one group per scheme, targeting its layers by
    name, and the format (``mixed-precision`` when the groups differ)."""
    by_scheme: dict[QuantScheme, list[str]] = {}
    for name, quant in layers.items():
        by_scheme.setdefault(quant, []).append(name)
    groups = {}
    for i, (quant, names) in enumerate(by_scheme.items()):
        fmt, kind, bits, strategy, size = _WRITTEN[quant]
        groups[f"group_{i}"] = {
            "targets": names, "format": fmt, "input_activations": None, "output_activations": None,
            "weights": {"num_bits": bits, "type": kind, "symmetric": True, "strategy": strategy,
                        "group_size": size, "dynamic": False, "actorder": None}}
    formats = {g["format"] for g in groups.values()}
    return {"config_groups": groups, "format": formats.pop() if len(formats) == 1 else MIXED,
            "quantization_status": "compressed", "ignore": [], "kv_cache_scheme": None}
