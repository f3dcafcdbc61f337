"""Replace the ``nn.Linear`` modules of a loaded model with :class:`SparseLinear`, in place."""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ShapeError
from ..format.codec import parse_pattern
from ..format.quant import QuantScheme
from ..models.architecture import select_linears
from .int8_dense import Int8Report, check_head, quantize_head
from .linear import SparseLinear


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    pattern: str
    backend: str
    dense_bytes: int
    sparse_bytes: int
    quant: str | None = None  # the values' quantization scheme


@dataclass
class SparsifyReport:
    replaced: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    head: list[Int8Report] = field(default_factory=list)  # the embedding and lm_head held as int8 (head=)

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.replaced)

    @property
    def sparse_bytes(self) -> int:
        return sum(r.sparse_bytes for r in self.replaced)

    @property
    def saved_bytes(self) -> int:
        return self.dense_bytes - self.sparse_bytes

    def to_dict(self) -> dict:
        return {
            "replaced": [vars(r) for r in self.replaced],
            "skipped": [{"name": n, "reason": why} for n, why in self.skipped],
            "dense_bytes": self.dense_bytes,
            "sparse_bytes": self.sparse_bytes,
            "saved_bytes": self.saved_bytes,
            **({"head": [vars(r) for r in self.head]} if self.head else {}),
        }

    def __str__(self) -> str:
        mb = 1 / 2**20
        lines = [f"replaced {len(self.replaced)} linear layers: {self.dense_bytes * mb:.2f} MiB dense -> "
                 f"{self.sparse_bytes * mb:.2f} MiB compressed (saved {self.saved_bytes * mb:.2f} MiB)"]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped]
        lines += [f"{r.name}: int8, tied to {r.tied_to}" if r.tied_to else
                  f"{r.name}: int8, {r.dense_bytes * mb:.2f} MiB -> {r.int8_bytes * mb:.2f} MiB" for r in self.head]
        return "\n".join(lines)


def _untie(model: nn.Module, name: str, linear: nn.Linear) -> None:
    """Sparsifying a tied lm_head unties it; the saved config must say so."""
    ptr = linear.weight.data_ptr()
    shared = any(p.data_ptr() == ptr for n, p in model.named_parameters(remove_duplicate=False)
                 if not n.startswith(name + "."))
    config = getattr(model, "config", None)
    if shared and config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


@torch.no_grad()
def sparsify(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    targets=None,
    ignore=("lm_head",),
    backend: str = "auto",
    pattern: str = "2:4",
    sparsity: float = 0.5,
    progress: bool | None = None,
    quant: QuantScheme | None = None,
    scales: Mapping[str, torch.Tensor] | None = None,
    head: str | None = None,
) -> SparsifyReport:
    """Swap selected ``nn.Linear`` modules for :class:`SparseLinear`; return what changed.

    ``masks`` maps module names to boolean masks ``[out, in]``; layers without a
    mask get a magnitude mask for ``pattern``. ``targets`` (globs or trailing
    name components; default: the layers in ``masks`` if given, else every
    ``nn.Linear``) minus ``ignore`` are replaced. A default-selected layer whose
    in_features the pattern cannot group is skipped with the reason; a layer
    the caller named explicitly (in ``masks`` or ``targets``) raises instead.

    ``quant`` stores every replaced layer's kept values quantized under that scheme, with the scales of
    ``scales`` (module name -> ``[out, groups]`` in the weight's dtype, from the pruning front-end: a weight
    it fake-quantized under them keeps its values exactly) or, for a layer it omits, absmax scales.

    ``head="int8"`` also holds the input embedding and the lm_head (left dense) as int8 codes, one scale per row
    (:func:`~sparse_runtime.nn.int8_dense.quantize_head`; a tied pair stays one tensor).
    """
    parse_pattern(pattern)
    if head is not None:
        check_head(head)
    masks = {} if masks is None else masks  # a Mapping; PackedMasks unpacks one layer at a time
    scales = {} if scales is None else scales
    if scales and quant is None:
        raise ValueError("sparsify: scales given without a quantization scheme (quant=)")
    modules = dict(model.named_modules())
    for what, names in (("masks", masks), ("scales", scales)):
        for name in names:
            if name not in modules:
                raise KeyError(f"{what} names {name!r}, which is not a module of the model")
            if not isinstance(modules[name], nn.Linear):
                raise TypeError(f"{what} names {name!r}, a {type(modules[name]).__name__}, not an nn.Linear")
    if targets is None and masks:
        targets = list(masks)

    report = SparsifyReport()
    chosen, report.skipped = select_linears(model, pattern, targets, ignore, keep=masks,
                                            explicit=targets is not None or bool(masks), quant=quant)
    unused = [n for n in scales if n not in chosen]
    if unused:
        raise ValueError(f"sparsify: scales name {unused[0]!r}, which is not among the layers replaced")
    for name in tqdm(chosen, desc="sparsify", unit="layer", disable=progress is False or not chosen,
                     leave=False):
        linear = modules[name]
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        _untie(model, name, linear)
        layer = SparseLinear.from_linear(linear, masks.get(name), backend=backend, pattern=pattern,
                                         sparsity=sparsity, name=name, quant=quant, scales=scales.get(name))
        setattr(parent, child, layer)
        w = linear.weight
        dense = w.numel() * w.element_size() + (0 if linear.bias is None else linear.bias.numel() * w.element_size())
        report.replaced.append(LayerReport(name, linear.in_features, linear.out_features, pattern,
                                           layer.active_backend, dense, layer.nbytes(),
                                           None if quant is None else quant.name))
    if head is not None:
        report.head = quantize_head(model, head)
    return report
