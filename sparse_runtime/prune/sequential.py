"""The sequential driver every calibrated prune runs on.

Capture the inputs of the first decoder layer once; then, per decoder layer: move only it to the compute device,
(optionally learn and fold its rotations,) hook its linears, run the calibration windows, prune, re-run the pruned
layer to make the next layer's inputs (so pruning errors propagate as at inference), move it back. Device memory
holds one decoder layer, the activations and one layer's statistics, whatever the model size. A search's trials
that share the dense model's statistics instead run on :mod:`.dense_statistics`."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..format.rotation import apply_rotation
from ..models.architecture import KEY_VALUE, decoder_linears, find_decoder_layers, matches
from ..models.residual_rotation import (UnsupportedArchitecture, check_layer, fold_ends, fold_norms, rotate_layer,
                                        set_boundary, transpose)
from .allocation import check_blocks
from .config import PruneConfig
from .methods import ALL_METHODS
from .quantize import check_groups
from .result import PruneResult
from .rotate import learn_rotation
from .statistics import (capture_inputs, forward_session, input_groups, layer_inputs, peak_bytes, run_collecting,
                         run_layer)


@torch.no_grad()
def prune_sequential(model, calib: torch.Tensor, config: PruneConfig, inputs=None) -> PruneResult:
    """Prune ``model`` in place with ``config``'s calibrated method, one decoder layer at a time, on calibration
    windows ``calib`` [N, L]. ``config.rotate`` first learns each layer's DenoiseRotator rotations on the dense
    layer's statistics, scored by the method's importance, and folds them in (see
    :mod:`sparse_runtime.models.residual_rotation`); the rotated layer is then pruned with fresh statistics.
    ``inputs`` reuses first-block inputs from :func:`~.statistics.capture_inputs` (a search's trials)."""
    method = ALL_METHODS[config.method]
    if method.statistics is None:
        raise ValueError(f"{config.method} needs no calibration: prune it with prune()")
    layers, path = find_decoder_layers(model)
    chosen, skipped = decoder_linears(model, config.pattern, config.targets, config.ignore)
    check_blocks(config.allocation, layers)
    check_groups(config.quant, chosen)
    device = config.torch_device()
    store = torch.device("cpu") if config.offload else device
    result = PruneResult.start(config, skipped, *calib.shape)
    rotate = config.rotate
    if rotate is not None:
        for i, layer in enumerate(layers):  # refuse before any work is done
            check_layer(layer, f"{path}.{i}")
        result.rotation = {"objective": rotate.objective, "steps": rotate.steps, "blocks": rotate.blocks,
                           "layers": []}
    t0 = time.perf_counter()
    qs = []
    with forward_session(model, device):
        inps, kwargs = inputs or capture_inputs(model, layers, path, calib, device, store)
        bar = tqdm(layers, desc=f"{config.method} {config.pattern}", unit="layer", disable=not config.progress)
        for i, layer in enumerate(bar):
            prefix = f"{path}.{i}."
            pattern, sparsity = config.block(i)
            names = {n: m for n, m in chosen.items() if n.startswith(prefix)} if sparsity else {}
            home = next(layer.parameters()).device
            layer.to(device)
            if rotate is not None:
                q, record = _rotate(layer, f"{path}.{i}", qs[-1] if qs else None, inps, kwargs[i], device,
                                    config.method, pattern, sparsity, rotate, config.progress)
                qs.append(q)
                result.rotation["layers"].append(record)
            if names:
                groups = _sink_groups(input_groups(layer, names, inps[0], kwargs[i], device), config.sink_weight)
                dense = {n: m.weight.detach().clone() for n, m in names.items()} if config.record_errors else {}
                # true-sequential: each group sees the outputs of the groups pruned before it
                for sets in ([[g] for g in groups] if config.sequential else [groups]):
                    stats = {g[0]: method.statistics(names[g[0]].in_features, device,
                                                     **_sink_options(g[0], config.sink_weight)) for g in sets}
                    run_collecting(layer, {names[k]: st for k, st in stats.items()}, inps, kwargs[i], device)
                    for g in sets:
                        for n in g:
                            prior = None if config.prior is None else config.prior.get(n)
                            result.record(n, method.prune_linear(names[n], stats[g[0]], pattern, sparsity, config,
                                                                 prior), pattern)
                    del stats
                outs = _run_recording_errors(layer, inps, kwargs[i], device, store, names, dense, result.errors)
                del dense
            else:
                outs = run_layer(layer, inps, kwargs[i], device, store)
            layer.to(home)
            inps = outs
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if qs:  # the first rotation goes into the embedding, the last into the final norm and lm_head
            fold_ends(model, path, qs[0], qs[-1])
            set_boundary(layers[0], None)
    result.seconds = time.perf_counter() - t0
    result.peak_device_bytes = peak_bytes(device)
    return result


def _sink_groups(groups: list[list[str]], weight: float) -> list[list[str]]:
    """With a sink weight, the key and value projections take their own statistics, apart from the linears that
    read the same input (q_proj)."""
    if weight == 1:
        return groups
    split = [[[n for n in g if matches(n, KEY_VALUE) == kv] for kv in (False, True)] for g in groups]
    return [part for parts in split for part in parts if part]


def _sink_options(name: str, weight: float) -> dict:
    """The statistics' options for the linears of the group ``name`` leads (:class:`~.statistics.Hessian`)."""
    return {"first_weight": weight} if weight != 1 and matches(name, KEY_VALUE) else {}


def _rotate(layer, where, prev, inps, kwargs, device, method, pattern, sparsity, opts, progress):
    """Learn and fold one layer's rotations. The layer's inputs arrive in the previous layer's coordinates
    (``h @ prev``); it is left taking them to its own, ``prev^T Q``, and its outputs stay in its own."""
    fold_norms(layer)
    set_boundary(layer, None if prev is None else transpose(prev))
    ref = run_layer(layer, inps[:1], kwargs, device, torch.device("cpu"))[0]
    stats = layer_inputs(layer, inps, kwargs, device)
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
