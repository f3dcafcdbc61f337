"""Residual-stream rotations (DenoiseRotator): change a decoder model's coordinates without changing its function.

Each decoder layer ``i`` gets an orthogonal ``Q_i`` (``[d, d]``, or block-diagonal ``[k, d/k, d/k]``) on the
residual stream, ``h_rot = h @ Q_i``, and an orthogonal ``R2`` per KV head on the value path:

* RMSNorm weights are first folded into the linears that read them, so the norms commute with ``Q``;
* readers of the stream (q, k, v, gate, up): ``W <- W @ Q``; writers (o, down): ``W <- Q^T @ W``, ``b <- b @ Q``;
* ``W_v <- R2^T W_v`` and ``W_o <- W_o R2`` per head (and ``b_v <- b_v @ R2``), folded entirely.

What cannot be folded is the change of coordinates between layers: layer ``i`` holds ONE buffer,
``residual_rotation = Q_{i-1}^T Q_i``, applied to its input by a forward pre-hook (one d x d, or k blocks, matmul
per layer boundary). The first layer's ``Q_0`` folds into the input embedding and the last layer's ``Q_{L-1}`` into
the final norm and lm_head (which are untied first)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SparseRuntimeError
from .architecture import ATTN_READERS, MLP_READERS, READERS, WRITERS, find_decoder_layers
from ..format.rotation import apply_rotation

BUFFER = "residual_rotation"
NORMS = ("input_layernorm", "post_attention_layernorm")
# norms that act inside a head (Qwen3's q_norm/k_norm) see neither Q nor R2
HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


class UnsupportedArchitecture(SparseRuntimeError, TypeError):
    """The model's layers do not commute with a residual rotation; rotating them would change the function."""


# -- orthogonal-matrix helpers (full [d, d] or blocks [k, b, b]) ------------------------------------------------------
def transpose(q: torch.Tensor) -> torch.Tensor:
    return q.transpose(-1, -2)


def rotate_inputs(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``W @ Q`` (rotate the input columns of ``W [out, d]``)."""
    return apply_rotation(w, q)


def rotate_outputs(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Q^T @ W`` (rotate the output rows of ``W [d, in]``)."""
    return apply_rotation(w.T, q).T


def head_blocks(r2: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The per-query-head blocks of ``R2`` ([n_kv, hd, hd] -> [n_heads, hd, hd]); GQA repeats each KV head."""
    return r2.repeat_interleave(n_heads // r2.shape[0], dim=0)


# -- layer structure ------------------------------------------------------------------------------------------------
def _probe_rmsnorm(name: str, norm: nn.Module) -> None:
    """A norm commutes with an orthogonal map once its weight is folded only if it is ``x / rms(x) * w``."""
    w = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or eps is None or getattr(norm, "bias", None) is not None:
        raise UnsupportedArchitecture(f"{name} ({type(norm).__name__}) is not an RMSNorm x / rms(x) * w; "
                                      "residual rotation needs one")
    x = torch.randn(3, w.numel(), generator=torch.Generator().manual_seed(0)).to(w)
    with torch.no_grad():
        got = norm(x).float()
        xf = x.float()
        want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-3 * float(want.abs().max())):
        raise UnsupportedArchitecture(f"{name} ({type(norm).__name__}) does not compute x / rms(x) * w "
                                      "(e.g. Gemma's x * (1 + w)); residual rotation would change the model")


def check_layer(layer: nn.Module, where: str = "layer") -> None:
    """Refuse a decoder layer whose structure a residual rotation would not preserve, with the reason."""
    mods = dict(layer.named_modules())
    missing = [n for n in (*READERS, *WRITERS, *NORMS) if n not in mods]
    if missing:
        raise UnsupportedArchitecture(f"{where} ({type(layer).__name__}) lacks {missing}: residual rotation "
                                      "supports Llama-style layers (pre-norm attention and MLP, q/k/v/o, "
                                      "gate/up/down)")
    extra = [n for n, m in mods.items() if "norm" in type(m).__name__.lower() and n not in (*NORMS, *HEAD_NORMS)]
    if extra:
        raise UnsupportedArchitecture(
            f"{where} ({type(layer).__name__}) has norms {extra} besides the two pre-norms: a norm on a sublayer's "
            "output before the residual add does not commute with a residual rotation")
    for n in (*READERS, *WRITERS):
        if not isinstance(mods[n], nn.Linear):
            raise UnsupportedArchitecture(f"{where}.{n} is a {type(mods[n]).__name__}; rotation runs before "
                                          "sparsification, on nn.Linear layers")
    for n in NORMS:
        _probe_rmsnorm(f"{where}.{n}", mods[n])


def head_geometry(layer: nn.Module) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) from the projections' shapes."""
    attn = layer.self_attn
    hd = getattr(attn, "head_dim", None)
    if hd is None:
        raise UnsupportedArchitecture(f"{type(attn).__name__} has no head_dim")
    n_heads, n_kv = attn.o_proj.in_features // hd, attn.v_proj.out_features // hd
    if n_heads * hd != attn.o_proj.in_features or n_kv * hd != attn.v_proj.out_features or n_heads % n_kv:
        raise UnsupportedArchitecture(f"{type(attn).__name__}: head_dim {hd} does not divide the projections")
    return n_heads, n_kv, hd


@torch.no_grad()
def fold_norms(layer: nn.Module) -> None:
    """``W <- W diag(g)`` for the linears after each pre-norm, then ``g <- 1``."""
    for norm, readers in (("input_layernorm", ATTN_READERS), ("post_attention_layernorm", MLP_READERS)):
        g = layer.get_submodule(norm).weight
        for r in readers:
            lin = layer.get_submodule(r)
            lin.weight.mul_(g.to(lin.weight.dtype))
        g.fill_(1)


@torch.no_grad()
def rotate_layer(layer: nn.Module, q1: torch.Tensor, r2: torch.Tensor | None = None) -> None:
    """Rotate a norm-folded layer's weights in place: its residual stream becomes ``h @ q1``."""
    n_heads, n_kv, hd = head_geometry(layer)
    for n in READERS:
        lin = layer.get_submodule(n)
        lin.weight.copy_(rotate_inputs(lin.weight.float(), q1.float()))
    for n in WRITERS:
        lin = layer.get_submodule(n)
        lin.weight.copy_(rotate_outputs(lin.weight.float(), q1.float()))
        if lin.bias is not None:
            lin.bias.copy_(apply_rotation(lin.bias.float(), q1.float()))
    if r2 is not None:
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        r2 = r2.float()
        v.weight.copy_(rotate_outputs(v.weight.float(), r2))
        if v.bias is not None:
            v.bias.copy_(apply_rotation(v.bias.float(), r2))
        o.weight.copy_(rotate_inputs(o.weight.float(), head_blocks(r2, n_heads)))


# -- the boundary rotation carried at run time --------------------------------------------------------------------
def _pre_hook(module, args, kwargs):
    r = getattr(module, BUFFER)
    if r is None:
        return None
    if args:
        return (apply_rotation(args[0], r), *args[1:]), kwargs
    kwargs["hidden_states"] = apply_rotation(kwargs["hidden_states"], r)
    return args, kwargs


def set_boundary(layer: nn.Module, rotation: torch.Tensor | None) -> None:
    """Make ``layer`` rotate its incoming hidden states by ``rotation`` (None: no rotation)."""
    if rotation is not None:
        p = next(layer.parameters())
        rotation = rotation.to(device=p.device, dtype=p.dtype)
    if BUFFER in layer._buffers:
        layer._buffers[BUFFER] = rotation
    else:
        layer.register_buffer(BUFFER, rotation)
    if getattr(layer, "_sr_rotation_hook", None) is None:
        layer._sr_rotation_hook = layer.register_forward_pre_hook(_pre_hook, with_kwargs=True)


def boundaries(layers: nn.ModuleList) -> dict[int, list[int]]:
    """``{layer index: rotation shape}`` for the layers that carry a boundary rotation."""
    return {i: list(getattr(l, BUFFER).shape) for i, l in enumerate(layers) if getattr(l, BUFFER, None) is not None}


def install_boundaries(layers: nn.ModuleList, shapes: dict, dtype=None) -> None:
    """Empty boundary buffers of the saved shapes, so a checkpoint's ``*.residual_rotation`` tensors load."""
    for i, shape in shapes.items():
        i = int(i)
        if not 0 <= i < len(layers):
            raise ValueError(f"residual rotation for layer {i}, but the model has {len(layers)} layers")
        p = next(layers[i].parameters())
        set_boundary(layers[i], torch.zeros(shape, dtype=dtype or p.dtype, device=p.device))


# -- the model's ends ---------------------------------------------------------------------------------------------
def final_norm(model: nn.Module, layers_path: str) -> nn.Module:
    parent = model.get_submodule(layers_path.rpartition(".")[0]) if "." in layers_path else model
    norm = getattr(parent, "norm", None)
    if norm is None:
        raise UnsupportedArchitecture(f"{type(model).__name__}: no final norm next to {layers_path}")
    return norm


def _untie(model: nn.Module) -> tuple[nn.Embedding, nn.Linear]:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or not isinstance(head, nn.Linear):
        raise UnsupportedArchitecture(f"{type(model).__name__}: no nn.Linear lm_head to fold the last rotation into")
    if head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone())
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    # transformers 5 also ties by this mapping; an untied model must not re-tie on load or .tie_weights()
    if getattr(model, "_tied_weights_keys", None):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    return emb, head


@torch.no_grad()
def fold_ends(model: nn.Module, layers_path: str, first: torch.Tensor, last: torch.Tensor) -> None:
    """Embedding ``E <- E @ Q_0``; final norm weight into lm_head, ``W <- (W diag(g)) @ Q_{L-1}``, ``g <- 1``."""
    norm = final_norm(model, layers_path)
    _probe_rmsnorm("final norm", norm)
    emb, head = _untie(model)
    emb.weight.copy_(rotate_inputs(emb.weight.float(), first.float()))
    g = norm.weight.float()
    head.weight.copy_(rotate_inputs(head.weight.float() * g, last.float()))
    norm.weight.fill_(1)


@torch.no_grad()
def rotate_model(model: nn.Module, q1s, r2s=None) -> None:
    """Rotate every decoder layer ``i`` by ``q1s[i]`` (and ``r2s[i]``), in place, keeping the model's function:
    norms folded, weights rotated, one boundary rotation per inner layer, the ends folded."""
    layers, path = find_decoder_layers(model)
    if len(q1s) != len(layers) or (r2s is not None and len(r2s) != len(layers)):
        raise ValueError(f"need one rotation per decoder layer ({len(layers)}), got {len(q1s)}")
    for i, layer in enumerate(layers):
        check_layer(layer, f"{path}.{i}")
    for i, layer in enumerate(layers):
        fold_norms(layer)
        rotate_layer(layer, q1s[i], None if r2s is None else r2s[i])
        if i:
            set_boundary(layer, transpose(q1s[i - 1]) @ q1s[i])
    fold_ends(model, path, q1s[0], q1s[-1])
