"""The one layer-by-layer calibration driver every calibrated method runs on.

Capture the inputs of the first decoder layer once; then, per decoder layer:
move only it to the compute device, hook its linears, run the calibration
windows, prune, re-run the pruned layer to make the next layer's inputs (so
pruning errors propagate as at inference), move it back. Device memory holds
one decoder layer, the activations and one layer's statistics, whatever the
model size."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..format.codec import parse_pattern
from ..format.masks import PackedMasks
from ..models.residual_rotation import (UnsupportedArchitecture, check_layer, fold_ends, fold_norms, rotate_layer,
                                 set_boundary, transpose)
from ..format.rotation import apply_rotation
from ..models.architecture import decoder_linears, find_decoder_layers
from .rotate import learn_rotation
from .statistics import capture_inputs, collect_dense, input_groups, layer_inputs, run_collecting, run_layer

@dataclass
class PruneResult:
    method: str
    pattern: str
    sparsity: float
    masks: PackedMasks = field(default_factory=PackedMasks)  # bitmaps: whole-model masks stay small
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)  # name -> ||WX - W_hat X||_F / ||WX||_F
    nsamples: int = 0
    seqlen: int = 0
    seconds: float = 0.0
    peak_device_bytes: int | None = None
    rotation: dict | None = None  # objective, steps, blocks and per-layer objective values when rotated
    patterns: dict[str, str] = field(default_factory=dict)  # name -> pattern it was pruned to (mixed N:M differ)
    allocation: dict | None = None  # the per-block rates (:class:`~.allocation.Allocation`) when not uniform

    def to_dict(self) -> dict:
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return {
            "method": self.method, "pattern": self.pattern,
            "sparsity": None if parse_pattern(self.pattern) else self.sparsity,
            "pruned_layers": len(self.masks), "achieved_sparsity": 1 - kept / total if total else 0.0,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "reconstruction_error": self.errors, "nsamples": self.nsamples, "seqlen": self.seqlen,
            "seconds": round(self.seconds, 2), "peak_device_bytes": self.peak_device_bytes,
            "allocation": self.allocation,
            "rotation": None if self.rotation is None else
            {k: v for k, v in self.rotation.items() if k != "layers"} | {"layers": [
                {k: v for k, v in r.items() if k != "history"} for r in self.rotation["layers"]]},
        }


def check_sparsity(pattern: str, sparsity: float) -> None:
    parse_pattern(pattern)
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")


# A method is two callables: new_stats(in_features, device) -> object with .add(x [tokens, in]),
# and prune_one(name, linear, stats, pattern, sparsity) -> bool mask [out, in] (it writes the pruned weight
# into linear); pattern and sparsity are the decoder block's (they differ per block under an allocation).
NewStats = Callable[[int, torch.device], object]
PruneOne = Callable[[str, nn.Linear, object, str, float], torch.Tensor]


@torch.no_grad()
def prune_layerwise(model: nn.Module, calib: torch.Tensor, new_stats: NewStats, prune_one: PruneOne, *,
                    method: str, pattern: str = "2:4", sparsity: float = 0.5, targets=None,
                    ignore=("lm_head",), device=None, true_sequential: bool = True, offload: bool = False,
                    record_errors: bool = False, progress: bool = True, rotate=None, allocation=None,
                    inputs=None, dense_stats: dict | None = None) -> PruneResult:
    """Prune ``model`` in place, one decoder layer at a time, on calibration windows ``calib`` [N, L].

    ``rotate`` (a :class:`~.rotate.RotateOptions`) first learns each layer's DenoiseRotator rotations on the
    dense layer's statistics, scored by ``method``'s importance, and folds them in (see
    :mod:`sparse_runtime.models.residual_rotation`); the rotated layer is then pruned with fresh statistics.
    ``allocation`` (an :class:`~.allocation.Allocation`) gives each decoder block its own pattern and sparsity
    (a block at 0 stays dense); ``inputs`` reuses first-block inputs from :func:`capture_inputs` (a search's trials).
    ``dense_stats`` (a dict, a search's trials) prunes every linear from the DENSE model's statistics instead of
    the pruned-so-far model's: an empty dict is filled in one dense pass (each layer's statistics and outputs
    from the same forward, so half the forwards of a sequential prune), for every linear the pattern can take
    whatever ``targets`` says, so later trials may target others; a filled one prunes without any forward."""
    check_sparsity(pattern, sparsity)
    layers, path = find_decoder_layers(model)
    chosen, skipped = decoder_linears(model, pattern, targets, ignore)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    store = torch.device("cpu") if offload else device
    result = PruneResult(method, pattern, sparsity, skipped=skipped, nsamples=calib.shape[0],
                         seqlen=calib.shape[1], allocation=None if allocation is None else allocation.to_dict())
    if dense_stats is not None and (rotate is not None or record_errors):
        raise ValueError("dense_stats (a search's shared statistics) cannot be combined with rotate or record_errors")
    if allocation is not None and len(allocation.rates) != len(layers):
        raise ValueError(f"the allocation has {len(allocation.rates)} block rates, the model {len(layers)} blocks")
    if dense_stats:
        return _prune_from_stats(chosen, dense_stats, prune_one, path, pattern, sparsity, allocation, result)
    collect = {} if dense_stats is None else decoder_linears(model, pattern, None, ignore)[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = False
    if rotate is not None:
        for i, layer in enumerate(layers):  # refuse before any work is done
            check_layer(layer, f"{path}.{i}")
        result.rotation = {"objective": rotate.objective, "steps": rotate.steps, "blocks": rotate.blocks,
                           "layers": []}
    qs = []
    try:
        inps, kwargs = inputs or capture_inputs(model, layers, path, calib, device, store)
        bar = tqdm(layers, desc=f"{method} {pattern}", unit="layer", disable=not progress)
        for i, layer in enumerate(bar):
            prefix = f"{path}.{i}."
            names = {n: m for n, m in chosen.items() if n.startswith(prefix)}
            block_pattern, block_sparsity = (pattern, sparsity) if allocation is None else allocation.block(i)
            if block_sparsity == 0:
                names = {}
            home = next(layer.parameters()).device
            layer.to(device)
            if rotate is not None:
                q, record = _rotate(layer, f"{path}.{i}", qs[-1] if qs else None, inps, kwargs[i], device,
                                    method, block_pattern, block_sparsity, rotate, progress)
                qs.append(q)
                result.rotation["layers"].append(record)
            if dense_stats is not None:
                outs = collect_dense(layer, {n: m for n, m in collect.items() if n.startswith(prefix)}, new_stats,
                                      inps, kwargs[i], device, store, dense_stats)
            elif names:
                groups = input_groups(layer, names, inps[0], kwargs[i], device)
                dense = {n: m.weight.detach().clone() for n, m in names.items()} if record_errors else {}
                # true-sequential: each group sees the outputs of the groups pruned before it
                for sets in ([[g] for g in groups] if true_sequential else [groups]):
                    stats = {g[0]: new_stats(names[g[0]].in_features, device) for g in sets}
                    run_collecting(layer, {names[k]: st for k, st in stats.items()}, inps, kwargs[i], device)
                    for g in sets:
                        for n in g:
                            result.masks[n] = prune_one(n, names[n], stats[g[0]], block_pattern, block_sparsity)
                            result.patterns[n] = block_pattern
                    del stats
                outs = _run_recording_errors(layer, inps, kwargs[i], device, store, names, dense, result.errors)
                del dense
            else:
                outs = run_layer(layer, inps, kwargs[i], device, store)
            layer.to(home)
            inps = outs
            if dense_stats is not None:
                _prune_from_stats(names, dense_stats, prune_one, path, pattern, sparsity, allocation, result)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if qs:  # the first rotation goes into the embedding, the last into the final norm and lm_head
            fold_ends(model, path, qs[0], qs[-1])
            set_boundary(layers[0], None)
    finally:
        if config is not None:
            config.use_cache = use_cache
    result.seconds = time.perf_counter() - t0
    if device.type == "cuda":
        result.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    return result


def _prune_from_stats(names, stats, prune_one, path, pattern, sparsity, allocation, result) -> PruneResult:
    """Prune ``names`` from saved statistics, each at its decoder block's rate; no forward."""
    t0 = time.perf_counter()
    for n, linear in names.items():
        block = int(n[len(path) + 1:].split(".", 1)[0])
        block_pattern, block_sparsity = (pattern, sparsity) if allocation is None else allocation.block(block)
        if block_sparsity == 0:
            continue
        if n not in stats:
            raise ValueError(f"dense_stats has no statistics for {n}; collect them with the same targets")
        result.masks[n] = prune_one(n, linear, stats[n], block_pattern, block_sparsity)
        result.patterns[n] = block_pattern
    result.seconds += time.perf_counter() - t0
    return result


def _rotate(layer, where, prev, inps, kwargs, device, method, pattern, sparsity, opts, progress):
    """Learn and fold one layer's rotations. The layer's inputs arrive in the previous layer's coordinates
    (``h @ prev``); it is left taking them to its own, ``prev^T Q``, and its outputs stay in its own."""
    fold_norms(layer)
    set_boundary(layer, None if prev is None else transpose(prev))
    ref = run_layer(layer, inps[:1], kwargs, device, torch.device("cpu"))[0]
    stats = layer_inputs(layer, inps, kwargs, device) if method != "magnitude" else None
    q1, r2, record = learn_rotation(layer, stats, method, pattern, sparsity, opts, desc=f"rotate {where}",
                                    progress=progress)
    del stats
    rotate_layer(layer, q1, r2)
    set_boundary(layer, q1 if prev is None else transpose(prev) @ q1)
    out = apply_rotation(run_layer(layer, inps[:1], kwargs, device, torch.device("cpu"))[0].float(),
                         transpose(q1).float())
    err = float((out - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    tol = 1e-3 if ref.dtype in (torch.float32, torch.float64) else 5e-2
    if not err < tol:
        raise UnsupportedArchitecture(f"{where}: rotating this layer changed its output (relative error {err:.2e} "
                                      f"> {tol}); its architecture does not commute with a residual rotation")
    record["function_error"] = err
    return q1, record


def _run_recording_errors(layer, inps, kwargs, device, store, names, dense, errors) -> list:
    """The pruned layer's outputs; with ``dense`` weights given, also ||WX - W_hat X||_F / ||WX||_F per linear."""
    sums = {n: [0.0, 0.0] for n in dense}

    def hook(mod, a, out, n):
        x = a[0].reshape(-1, a[0].shape[-1])
        ref = x @ dense[n].T
        sums[n][0] += (ref - x @ mod.weight.T).float().pow(2).sum().item()
        sums[n][1] += ref.float().pow(2).sum().item()

    handles = [names[n].register_forward_hook(lambda mod, a, out, n=n: hook(mod, a, out, n)) for n in dense]
    try:
        outs = run_layer(layer, inps, kwargs, device, store)
    finally:
        for h in handles:
            h.remove()
    errors.update({n: (d / r) ** 0.5 if r else 0.0 for n, (d, r) in sums.items()})
    return outs
