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

from ..errors import SparseRuntimeError
from ..format import parse_pattern
from ..masks import PackedMasks
from ..residual_rotation import (UnsupportedArchitecture, check_layer, fold_ends, fold_norms, rotate_layer,
                                 set_boundary, transpose)
from ..rotation import apply_rotation
from ..sparsify import select_linears as shared_select

# where transformers families keep their decoder layers
LAYER_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers", "transformer.h",
               "gpt_neox.layers", "layers")


class UnsupportedModel(SparseRuntimeError, TypeError):
    """The model has no decoder-layer stack the layerwise driver can walk."""


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


def select_linears(model: nn.Module, pattern: str, targets=None, ignore=("lm_head",)):
    """``({name: nn.Linear}, [(name, reason)])``: the linears to prune and those skipped.

    Default targets are every ``nn.Linear`` inside the decoder layers; one the
    pattern cannot group is skipped with the reason. A layer named by
    ``targets`` (globs or trailing name components, as :func:`sparsify`) that
    cannot be grouped raises :class:`ShapeError`."""
    _, path = find_decoder_layers(model)
    chosen, skipped = shared_select(model, pattern, targets, ignore, within=path)
    if not chosen:
        raise ValueError(f"no linear layer to prune for pattern {pattern} (skipped: {skipped or 'none found'})")
    return chosen, skipped


def check_sparsity(pattern: str, sparsity: float) -> None:
    parse_pattern(pattern)
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")


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


def _run(layer, inps, kwargs, device, store=None) -> list:
    outs = []
    for x in inps:
        y = layer(x.to(device), **kwargs)
        y = y[0] if isinstance(y, (tuple, list)) else y  # older transformers return a tuple
        if store is not None:
            outs.append(y.to(store))
    return outs


class _Tapped(Exception):
    """Raised once every tapped linear has seen its input: the rest of the layer's forward is not needed."""


def _run_with_stats(layer, taps: dict, inps, kwargs, device, store=None) -> list:
    """:func:`_run` with each tapped linear's inputs added to its statistics (``taps``: {module: stats}).
    Without ``store`` (no outputs wanted) each forward stops as soon as every tapped linear has been reached:
    a true-sequential prune's statistics for q/k/v need only the norm, not the whole layer."""
    seen = set()

    def hook(mod, a, s):
        s.add(a[0].reshape(-1, a[0].shape[-1]))
        seen.add(mod)
        if store is None and len(seen) == len(taps):
            raise _Tapped

    handles = [m.register_forward_pre_hook(lambda mod, a, s=s: hook(mod, a, s)) for m, s in taps.items()]
    try:
        if store is not None:
            return _run(layer, inps, kwargs, device, store)
        for x in inps:
            seen.clear()
            try:
                _run(layer, [x], kwargs, device)
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
        _run(layer, [x], kwargs, device)
    finally:
        for h in handles:
            h.remove()
    groups = [g for _, g in seen]
    missing = set(names) - {n for g in groups for n in g}
    if missing:
        raise UnsupportedModel(f"linears {sorted(missing)} were not called in a forward of their decoder layer")
    return groups


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
    :mod:`sparse_runtime.residual_rotation`); the rotated layer is then pruned with fresh statistics.
    ``allocation`` (an :class:`~.allocation.Allocation`) gives each decoder block its own pattern and sparsity
    (a block at 0 stays dense); ``inputs`` reuses first-block inputs from :func:`capture_inputs` (a search's trials).
    ``dense_stats`` (a dict, a search's trials) prunes every linear from the DENSE model's statistics instead of
    the pruned-so-far model's: an empty dict is filled in one dense pass (each layer's statistics and outputs
    from the same forward, so half the forwards of a sequential prune), for every linear the pattern can take
    whatever ``targets`` says, so later trials may target others; a filled one prunes without any forward."""
    check_sparsity(pattern, sparsity)
    layers, path = find_decoder_layers(model)
    chosen, skipped = select_linears(model, pattern, targets, ignore)
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
    collect = {} if dense_stats is None else select_linears(model, pattern, None, ignore)[0]
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
                outs = _collect_dense(layer, {n: m for n, m in collect.items() if n.startswith(prefix)}, new_stats,
                                      inps, kwargs[i], device, store, dense_stats)
            elif names:
                groups = input_groups(layer, names, inps[0], kwargs[i], device)
                dense = {n: m.weight.detach().clone() for n, m in names.items()} if record_errors else {}
                # true-sequential: each group sees the outputs of the groups pruned before it
                for sets in ([[g] for g in groups] if true_sequential else [groups]):
                    stats = {g[0]: new_stats(names[g[0]].in_features, device) for g in sets}
                    _run_with_stats(layer, {names[k]: st for k, st in stats.items()}, inps, kwargs[i], device)
                    for g in sets:
                        for n in g:
                            result.masks[n] = prune_one(n, names[n], stats[g[0]], block_pattern, block_sparsity)
                            result.patterns[n] = block_pattern
                    del stats
                outs = _run_recording_errors(layer, inps, kwargs[i], device, store, names, dense, result.errors)
                del dense
            else:
                outs = _run(layer, inps, kwargs[i], device, store)
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


def _collect_dense(layer, names, new_stats, inps, kwargs, device, store, into: dict) -> list:
    """One forward of the unpruned layer: its outputs, and each linear's statistics into ``into`` (linears that
    share an input share one statistics object)."""
    if not names:
        return _run(layer, inps, kwargs, device, store)
    groups = input_groups(layer, names, inps[0], kwargs, device)
    stats = {g[0]: new_stats(names[g[0]].in_features, device) for g in groups}
    outs = _run_with_stats(layer, {names[k]: st for k, st in stats.items()}, inps, kwargs, device, store)
    into.update({n: stats[g[0]] for g in groups for n in g})
    return outs


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


def layer_inputs(layer, inps, kwargs, device):
    """The four input Hessians a rotation is learned on, from one pass of the dense layer."""
    from .rotate import LayerInputs
    from .sparsegpt import Hessian

    taps = {"attn": layer.self_attn.q_proj, "o": layer.self_attn.o_proj, "mlp": layer.mlp.gate_proj,
            "down": layer.mlp.down_proj}
    stats = {k: Hessian(m.in_features, device) for k, m in taps.items()}
    _run_with_stats(layer, {m: stats[k] for k, m in taps.items()}, inps, kwargs, device)
    return LayerInputs(**{k: s.H for k, s in stats.items()})


def _rotate(layer, where, prev, inps, kwargs, device, method, pattern, sparsity, opts, progress):
    """Learn and fold one layer's rotations. The layer's inputs arrive in the previous layer's coordinates
    (``h @ prev``); it is left taking them to its own, ``prev^T Q``, and its outputs stay in its own."""
    from .rotate import learn_rotation

    fold_norms(layer)
    set_boundary(layer, None if prev is None else transpose(prev))
    ref = _run(layer, inps[:1], kwargs, device, torch.device("cpu"))[0]
    stats = layer_inputs(layer, inps, kwargs, device) if method != "magnitude" else None
    q1, r2, record = learn_rotation(layer, stats, method, pattern, sparsity, opts, desc=f"rotate {where}",
                                    progress=progress)
    del stats
    rotate_layer(layer, q1, r2)
    set_boundary(layer, q1 if prev is None else transpose(prev) @ q1)
    out = apply_rotation(_run(layer, inps[:1], kwargs, device, torch.device("cpu"))[0].float(),
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
        outs = _run(layer, inps, kwargs, device, store)
    finally:
        for h in handles:
            h.remove()
    errors.update({n: (d / r) ** 0.5 if r else 0.0 for n, (d, r) in sums.items()})
    return outs
