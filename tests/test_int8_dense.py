"""Dense int8 weights (``nn.int8_dense``): the int8 embedding and lm_head against a float64 reference of the
fake-quantized weight, the tied pair as one tensor, every compute path agreeing, and bad input refused."""
import copy
import types

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from sparse_runtime import sparsify
from sparse_runtime.errors import QuantError, ShapeError
from sparse_runtime.format.quant import dequantize_codes, fake_quantize
from sparse_runtime.nn import int8_dense
from sparse_runtime.nn.int8_dense import (SCHEME, Int8Embedding, Int8Linear, int8_matmul, packed_applies,
                                          quantize_dense, quantize_head)

IDS = torch.tensor([[1, 403, 407, 261, 378, 10, 300, 95, 5, 42]])


@pytest.fixture(scope="module")
def stories(stories_dir, one_thread):
    return AutoModelForCausalLM.from_pretrained(stories_dir).eval()


def _linear(n=96, k=72, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    lin.weight.data[3] = 0  # an all-zero row: scale 1, codes 0
    return lin


def _reference(x, lin):
    """float64 ``x @ fake_quantize(W)^T + b``."""
    w = fake_quantize(lin.weight.detach(), SCHEME).double()
    y = x.double() @ w.T
    return y if lin.bias is None else y + lin.bias.detach().double()


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_float64_reference_of_fake_quantized_weight(bias):
    lin = _linear(bias=bias)
    layer = Int8Linear.from_linear(lin)
    assert layer.weight_codes.dtype == torch.int8 and layer.weight_scales.shape == (96, 1)
    assert torch.equal(layer.dense_weight(), fake_quantize(lin.weight.detach(), SCHEME))
    x = torch.randn(2, 5, 72)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 5, 96) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(x, lin), rtol=1e-5, atol=1e-5)


def test_embedding_rows_are_the_fake_quantized_rows_bit_for_bit():
    emb = nn.Embedding(50, 24)
    layer = Int8Embedding.from_embedding(emb)
    ids = torch.tensor([[0, 7, 7, 49], [3, 1, 2, 0]])
    ref = fake_quantize(emb.weight.detach(), SCHEME)
    with torch.no_grad():
        out = layer(ids)
    assert torch.equal(out, ref[ids])
    torch.testing.assert_close(out.double(), ref.double()[ids], rtol=0, atol=0)
    assert (out - emb.weight.detach()[ids]).abs().max() <= emb.weight.detach().abs().max() / 254 + 1e-7


def test_packed_kernel_and_fallback_agree():
    """bf16 on the CPU runs aten._weight_int8pack_mm; fp32 eager dequantizes then runs F.linear; compiled fp32
    streams the codes: all against the same float64 reference."""
    lin = _linear(k=80, bias=False)
    layer = Int8Linear.from_linear(lin)
    codes, scales = layer.weight_codes, layer.weight_scales
    x = torch.randn(3, 80)
    ref = _reference(x, lin)
    xb, sb = x.bfloat16(), scales.bfloat16()
    assert packed_applies(xb, codes, sb) and not packed_applies(x, codes, scales)
    packed = int8_matmul(xb, codes, sb)
    fallback = torch.nn.functional.linear(xb, dequantize_codes(codes, sb))
    tol = dict(rtol=2e-2, atol=2e-2 * ref.abs().max().item())  # bf16 inputs and outputs
    torch.testing.assert_close(packed.double(), fallback.double(), **tol)
    torch.testing.assert_close(packed.double(), ref, **tol)
    torch.testing.assert_close(int8_matmul(x, codes, scales).double(), ref, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(int8_matmul, dynamic=True)
    for rows in (1, 3, 40):  # the fused pass and, beyond its rows, the dense GEMM
        xr = torch.randn(rows, 80)
        torch.testing.assert_close(compiled(xr, codes, scales).double(), _reference(xr, lin), rtol=1e-5, atol=1e-5)


def test_eager_cpu_blocks_match_the_whole_weight(monkeypatch):
    """Eager fp32 on the CPU widens the codes a block of rows at a time (here 16 of 100: the last block short), with
    gradients to x as through one F.linear."""
    monkeypatch.setattr(int8_dense, "_BLOCK_BYTES", 16 * 72 * 4)
    blocks = []
    linear = lambda x, w: blocks.append(len(w)) or torch.nn.functional.linear(x, w)  # noqa: E731
    monkeypatch.setattr(int8_dense, "F", types.SimpleNamespace(linear=linear))
    lin = _linear(n=100, k=72, bias=False)
    layer = Int8Linear.from_linear(lin)
    for rows in (1, 5):
        blocks.clear()
        x = torch.randn(rows, 72, requires_grad=True)
        y = int8_matmul(x, layer.weight_codes, layer.weight_scales)
        assert blocks == [16] * 6 + [4]
        torch.testing.assert_close(y.double(), _reference(x.detach(), lin), rtol=1e-5, atol=1e-5)
        g = torch.randn(rows, 100)
        y.backward(g)
        torch.testing.assert_close(x.grad.double(), g.double() @ layer.dense_weight().double(), rtol=1e-5, atol=1e-5)


def test_packed_kernel_is_kept_from_inputs_it_gets_wrong():
    """K not a multiple of 16 (the kernel reads past each row) and misaligned views (its aligned loads crash)
    take the fallback, which is right."""
    lin = _linear(k=72, bias=False)
    layer = Int8Linear.from_linear(lin).to(torch.bfloat16)
    x = torch.randn(3, 72)
    assert not packed_applies(x.bfloat16(), layer.weight_codes, layer.weight_scales)
    tol = dict(rtol=2e-2, atol=2e-2 * _reference(x, lin).abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(layer(x.bfloat16()).double(), _reference(x.bfloat16(), lin), **tol)
    wide = Int8Linear.from_linear(_linear(k=80, bias=False)).to(torch.bfloat16)
    x = torch.randn(1 + 3 * 80).bfloat16()[1:].view(3, 80)  # 2 bytes past an aligned start
    assert not packed_applies(x, wide.weight_codes, wide.weight_scales)
    with torch.no_grad():
        out = wide(x)
    assert out.shape == (3, 96) and torch.isfinite(out).all()


def test_tied_head_is_one_int8_tensor(stories):
    model = copy.deepcopy(stories)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = copy.deepcopy(stories)  # the dense model computing with the fake-quantized shared weight
    ref.model.embed_tokens.weight.data = fake_quantize(ref.model.embed_tokens.weight.detach(), SCHEME)
    report = quantize_head(model)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, Int8Embedding) and isinstance(head, Int8Linear) and head.tied is emb
    assert [(r.name, r.tied_to) for r in report] == [("model.embed_tokens", None), ("lm_head", "model.embed_tokens")]
    assert report[0].int8_bytes == 512 * 64 + 512 * 4 and report[1].int8_bytes == 0
    assert not [k for k in model.state_dict() if k.startswith("lm_head.")]  # saved once, under the embedding
    assert not model.config.tie_word_embeddings  # transformers' tie (by .weight) no longer applies
    with torch.no_grad():
        out, want = model(IDS).logits, ref(IDS).logits
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    model.to(torch.bfloat16)  # a move keeps the head reading the embedding's (moved) tensors
    assert head.codes is emb.weight_codes and head.scales.dtype == torch.bfloat16
    assert head.codes.dtype == torch.int8 and model(IDS).logits.dtype == torch.bfloat16


def test_untied_head_gets_its_own_codes(stories):
    model = copy.deepcopy(stories)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    quantize_head(model)
    assert model.lm_head.tied is None
    assert torch.equal(model.lm_head.dense_weight(), fake_quantize(stories.lm_head.weight.detach() * 0.5, SCHEME))


def test_sparsify_head_option(stories):
    model = copy.deepcopy(stories)
    report = sparsify(model, head="int8", backend="reference", progress=False)
    assert isinstance(model.model.embed_tokens, Int8Embedding) and model.lm_head.tied is model.model.embed_tokens
    assert [r.name for r in report.head] == ["model.embed_tokens", "lm_head"]
    assert "lm_head: int8, tied to model.embed_tokens" in str(report) and report.to_dict()["head"]


def test_quantize_dense_holds_every_weight_as_int8(stories):
    model = copy.deepcopy(stories)
    ref = copy.deepcopy(stories)
    weights = {id(m.weight): m.weight for m in ref.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    for w in weights.values():  # the tied weight once
        w.data = fake_quantize(w.detach(), SCHEME)
    report = quantize_dense(model)
    assert len(report) == 35 + 2
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    assert all(t.dtype == torch.int8 for n, t in model.state_dict().items() if n.endswith("weight_codes"))
    with torch.no_grad():
        out, want = model(IDS).logits, ref(IDS).logits
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_bad_input_is_a_clear_error(stories):
    model = copy.deepcopy(stories)
    with pytest.raises(ValueError, match="unknown head quantization 'int4'; supported: int8"):
        sparsify(model, head="int4")
    assert type(model.model.embed_tokens) is nn.Embedding  # refused before anything changed
    with pytest.raises(ValueError, match="unknown head quantization"):
        quantize_head(model, "fp8")
    quantize_head(model)
    with pytest.raises(TypeError, match="the input embedding is a Int8Embedding, not an nn.Embedding"):
        quantize_head(model)
    with pytest.raises(ShapeError, match="cannot read an embedding of shape"):
        Int8Linear(64, 511, bias=False, tied=model.model.embed_tokens)
    with pytest.raises(TypeError, match="Int8Linear"):
        Int8Linear(4, 4, dtype=torch.int8)
    layer = Int8Linear.from_linear(_linear())
    layer.weight_scales[5, 0] = float("inf")
    with pytest.raises(QuantError, match="row 5, group 0 has scale inf; scales must be finite"):
        layer.validate("q")
    layer.weight_scales = torch.ones(96, 2)
    with pytest.raises(ShapeError, match=r"q.weight_scales: shape \[96, 2\], expected \[96, 1\]"):
        layer.validate("q")
    layer.weight_scales = torch.ones(96, 1, dtype=torch.float64)
    layer.weight_codes = layer.weight_codes.to(torch.uint8)
    with pytest.raises(TypeError, match="dtype torch.uint8, expected torch.int8"):
        layer.validate("q")
