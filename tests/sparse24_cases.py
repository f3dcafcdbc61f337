"""Random 2:4 layers, float64 references and tolerances shared by the Triton kernel tests."""
import torch

from sparse_runtime.format.codec import SparseWeight
from sparse_runtime.format.quant import QuantScheme
from sparse_runtime.format.rotation import apply_rotation
from sparse_runtime.ops.triton_ops import prepare_sparse24

# Error bound per unit of sum(|x| |w|): output rounding plus accumulation.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_mask(n, k, gen):
    """Random 2:4 mask: every group of 4 keeps a random 2."""
    idx = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, idx, True).view(n, k)


def random_layer(n, k, dtype, seed, device="cpu"):
    """(SparseWeight, values, meta32) of a random 2:4 [n, k] weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    sw = SparseWeight.compress(w, random_mask(n, k, gen).to(device))
    return (sw, *prepare_sparse24(sw.values, sw.meta))


def random_quantized_layer(n, k, scheme, group, dtype, seed, device="cpu"):
    """(SparseWeight, codes, meta32) of a random 2:4 [n, k] weight quantized by ``scheme`` (``group`` columns per
    scale, None: the scheme's default); its ``to_dense()`` is the dequantized weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    sw = SparseWeight.compress(w, random_mask(n, k, gen).to(device), quant=QuantScheme.parse(scheme, group))
    return (sw, *prepare_sparse24(sw.values, sw.meta))


def random_rotation(k, block, dtype, seed, device="cpu"):
    """Orthogonal [k, k] (block=None) or blocks [k/b, b, b]."""
    gen = torch.Generator().manual_seed(seed)
    b = k if block is None else block
    q = torch.linalg.qr(torch.randn(k // b, b, b, generator=gen, dtype=torch.float64))[0]
    return (q[0] if block is None else q).to(device=device, dtype=dtype)


def reference(x, sw, bias=None, rotation=None):
    """float64 result and the scale sum(|x| |w|) (+|b|) that bounds its rounding error."""
    x = x.double()
    if rotation is not None:
        x = apply_rotation(x, rotation.double()).to(rotation.dtype).double()  # the kernel rounds x @ R too
    w = sw.to_dense().double()
    y = x @ w.T
    scale = x.abs() @ w.abs().T
    if bias is not None:
        y = y + bias.double()
        scale = scale + bias.double().abs()
    return y, scale


def assert_close(y, ref, scale, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all(), "some output elements were not written"
    err = (y.double() - ref.to(y.device)).abs()
    bound = TOL[dtype] * (scale.to(y.device) + 1)
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} elements off; worst {float((err / bound).max()):.2f}x the bound"
