"""Dense weights held as int8 codes (weight-only, activations stay in the model's dtype): :class:`Int8Linear`,
:class:`Int8Embedding`, :func:`quantize_head` (the embedding and lm_head, a fifth to a third of a small model's
bytes) and :func:`quantize_dense` (every linear too: the dense int8 baseline a 2:4 + int8 model is compared with).

Codes and scales are :mod:`sparse_runtime.format.quant`'s int8 scheme: symmetric absmax, one scale per row
(``W[r] ~= codes[r] * scales[r]``; a linear's rows are its outputs, an embedding's its tokens). A tied head is one
int8 tensor: the :class:`Int8Linear` reads the :class:`Int8Embedding`'s codes and scales, and only the embedding
holds (and saves) them.

``y = (x @ codes^T) * scales``. On the CPU, bf16 inputs run torch's weight-only kernel
``aten._weight_int8pack_mm`` where it is both right and fast (:func:`packed_applies`). Its fp32 and fp16 inputs run
a scalar loop in torch 2.13, several times slower than a dense fp32 GEMV; instead, under ``torch.compile`` a few rows
(decode) run a broadcast-multiply-sum that inductor fuses into one pass over the int8 codes, and everything else
(compiled beyond those rows, CUDA) dequantizes, then runs ``F.linear``; eager on the CPU, a block of rows at a time is
widened to the scales' dtype and multiplied, and the output scaled per row (the whole fp32 weight never exists).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeError
from ..format.codec import FLOAT_DTYPES, unsupported_dtype
from ..format.quant import QuantScheme, absmax_scales, check_codes, check_scales, dequantize_codes, quantize_codes

SCHEME = QuantScheme("int8")
HEAD_SCHEMES = ("int8",)  # what sparsify(head=...) and --quantize-head take
_PACKED_K = 16  # _weight_int8pack_mm's vectorized bf16 kernel steps K by 16, with no tail
_FUSED_ROWS = 16  # rows up to which compiled fp32 streams the codes once; beyond, one dense GEMM is faster
# eager CPU: the codes are widened a block of rows at a time (this many bytes, cache-resident), never whole: a
# whole SmolLM2 head is 113 MB of fp32 written and read again for every call
_BLOCK_BYTES = 4 << 20


def check_head(scheme) -> None:
    """Refuse a head quantization other than :data:`HEAD_SCHEMES`."""
    if scheme not in HEAD_SCHEMES:
        raise ValueError(f"unknown head quantization {scheme!r}; supported: {', '.join(HEAD_SCHEMES)}")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [N, K] int8, scales [N, 1])`` of a dense weight, scales in its dtype."""
    scales = absmax_scales(weight, SCHEME)
    return quantize_codes(weight, scales, SCHEME), scales


def packed_applies(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether ``aten._weight_int8pack_mm`` computes ``x @ codes^T * scales`` right and fast. In torch 2.13 its
    vectorized CPU kernel takes bf16 only; it steps K by 16 with no tail (another K reads past the rows: wrong
    results or a crash) and uses aligned loads (a misaligned view crashes it), so it runs eagerly, on contiguous
    64-byte-aligned tensors only: ``torch.compile`` gives no pointer to check."""
    return (x.device.type == "cpu" and x.dtype == scales.dtype == torch.bfloat16 and x.shape[1] % _PACKED_K == 0
            and not torch.compiler.is_compiling() and x.is_contiguous() and codes.is_contiguous()
            and x.data_ptr() % 64 == 0 and codes.data_ptr() % 64 == 0)


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ (codes [N, K] * scales [N, 1])^T`` in ``x``'s dtype (see the module docstring for the paths)."""
    if packed_applies(x, codes, scales):
        return torch.ops.aten._weight_int8pack_mm(x, codes, scales.view(-1))
    if torch.compiler.is_compiling() and x.shape[0] <= _FUSED_ROWS:
        return (x.unsqueeze(1) * codes).sum(-1) * scales.view(-1)
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        return F.linear(x, dequantize_codes(codes, scales))
    rows = max(16, _BLOCK_BYTES // (max(1, codes.shape[1]) * scales.element_size()))
    # one scale per row: (x @ codes^T) * scales, so each block is only widened, not scaled
    return torch.cat([F.linear(x, codes[n:n + rows].to(scales.dtype)) for n in range(0, codes.shape[0], rows)],
                     dim=-1) * scales.view(-1)


def _check_dtype(dtype, what: str) -> torch.dtype:
    dtype = dtype or torch.get_default_dtype()
    why = unsupported_dtype(dtype, FLOAT_DTYPES)
    if why:
        raise TypeError(f"{what}: {why}")
    return dtype


def _check_int8(codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], name: str) -> None:
    """Codes [rows, cols] int8 and scales [rows, 1] floating, finite and positive."""
    if tuple(codes.shape) != shape:
        raise ShapeError(f"{name}.weight_codes: shape {list(codes.shape)}, expected {list(shape)}")
    if tuple(scales.shape) != (shape[0], 1):
        raise ShapeError(f"{name}.weight_scales: shape {list(scales.shape)}, expected {[shape[0], 1]}")
    check_codes(codes, SCHEME, name)
    if scales.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.weight_scales: dtype {scales.dtype}, expected a floating dtype")
    check_scales(scales, name)


class Int8Embedding(nn.Module):
    """``nn.Embedding`` with int8 rows: ``E[ids] = codes[ids] * scales[ids]`` in the scales' dtype."""

    DENSE = nn.Embedding  # the module it replaces

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, device=None,
                 dtype=None):
        super().__init__()
        dtype = _check_dtype(dtype, "Int8Embedding")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight_codes", torch.zeros(num_embeddings, embedding_dim, device=device,
                                                         dtype=torch.int8))
        self.register_buffer("weight_scales", torch.ones(num_embeddings, 1, device=device, dtype=dtype))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        w = emb.weight.detach()
        layer = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device=w.device, dtype=w.dtype)
        layer.weight_codes, layer.weight_scales = quantize_rows(w)
        return layer

    @property
    def shape(self) -> tuple[int, int]:
        """The dense weight's shape."""
        return self.num_embeddings, self.embedding_dim

    def validate(self, name: str = "embedding") -> None:
        _check_int8(self.weight_codes, self.weight_scales, self.shape, name)

    def dense_weight(self) -> torch.Tensor:
        return dequantize_codes(self.weight_codes, self.weight_scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_codes).to(self.weight_scales.dtype) * F.embedding(ids, self.weight_scales)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 codes, scales {self.weight_scales.dtype}"


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight: ``y = (x @ codes^T) * scales + bias``, computed in the scales' dtype.

    ``tied``: an :class:`Int8Embedding` of shape ``[out_features, in_features]`` whose codes and scales this layer
    reads (a tied lm_head); it is not a submodule, so its tensors stay the embedding's, moved and saved once."""

    DENSE = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 tied: Int8Embedding | None = None):
        super().__init__()
        dtype = _check_dtype(dtype, "Int8Linear")
        self.in_features, self.out_features = in_features, out_features
        object.__setattr__(self, "tied", tied)  # a plain attribute: not registered as a submodule
        if tied is None:
            self.register_buffer("weight_codes", torch.zeros(out_features, in_features, device=device,
                                                             dtype=torch.int8))
            self.register_buffer("weight_scales", torch.ones(out_features, 1, device=device, dtype=dtype))
        elif tied.shape != (out_features, in_features):
            raise ShapeError(f"Int8Linear({in_features}->{out_features}) cannot read an embedding of shape "
                             f"{list(tied.shape)}")
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype)
        layer.weight_codes, layer.weight_scales = quantize_rows(w)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @property
    def codes(self) -> torch.Tensor:
        return (self if self.tied is None else self.tied).weight_codes

    @property
    def scales(self) -> torch.Tensor:
        return (self if self.tied is None else self.tied).weight_scales

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def validate(self, name: str = "linear") -> None:
        _check_int8(self.codes, self.scales, self.shape, name)

    def dense_weight(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x.reshape(-1, self.in_features), self.codes, self.scales).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        tied = ", tied to an embedding" if self.tied is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 codes{tied}")


INT8_MODULES = (Int8Linear, Int8Embedding)


@dataclass
class Int8Report:
    name: str
    kind: str  # "linear" or "embedding"
    dense_bytes: int
    int8_bytes: int  # 0 for a tied head: its codes are the embedding's
    tied_to: str | None = None


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


@torch.no_grad()
def quantize_head(model: nn.Module, scheme: str = "int8") -> list[Int8Report]:
    """Hold ``model``'s input embedding and (if it is an ``nn.Linear``) its output projection as int8 codes, in
    place; a tied pair becomes one int8 tensor that both read. An lm_head already replaced (a SparseLinear) keeps
    its own weights."""
    check_head(scheme)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not nn.Embedding:  # a subclass (Gemma's scaled embedding) does more than a lookup
        raise TypeError(f"quantize_head: the input embedding is a {type(emb).__name__}, not an nn.Embedding")
    emb_name = _name_of(model, emb)
    new_emb = Int8Embedding.from_embedding(emb)
    _replace(model, emb_name, new_emb)
    report = [Int8Report(emb_name, "embedding", _nbytes(emb.weight),
                         _nbytes(new_emb.weight_codes, new_emb.weight_scales))]
    if type(head) is nn.Linear:
        head_name = _name_of(model, head)
        if head.weight is emb.weight:
            new_head = Int8Linear(head.in_features, head.out_features, head.bias is not None, head.weight.device,
                                  head.weight.dtype, tied=new_emb)
            if head.bias is not None:
                new_head.bias.data.copy_(head.bias.detach())
            # transformers ties by `.weight`, which these modules do not have: the tie is the head's own now
            if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                model.config.tie_word_embeddings = False
            report.append(Int8Report(head_name, "linear", 0, _nbytes(head.bias), tied_to=emb_name))
        else:
            new_head = Int8Linear.from_linear(head)
            report.append(Int8Report(head_name, "linear", _nbytes(head.weight, head.bias),
                                     _nbytes(new_head.weight_codes, new_head.weight_scales, head.bias)))
        _replace(model, head_name, new_head)
    return report


@torch.no_grad()
def quantize_dense(model: nn.Module, head: bool = True) -> list[Int8Report]:
    """Every ``nn.Linear`` of ``model`` as an :class:`Int8Linear` in place, and with ``head`` the embedding and
    lm_head as :func:`quantize_head` does (a tied lm_head stays tied); without, both stay as they are."""
    out = model.get_output_embeddings()
    report = []
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and m is not out:
            layer = Int8Linear.from_linear(m)
            _replace(model, name, layer)
            report.append(Int8Report(name, "linear", _nbytes(m.weight, m.bias),
                                     _nbytes(layer.weight_codes, layer.weight_scales, layer.bias)))
    if head:
        report += quantize_head(model)
    return report
