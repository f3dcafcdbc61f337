"""sparse_runtime.ops.cpu24: the CPU 2:4 linear against float64 references, on every ISA this CPU runs."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_runtime.errors import BackendUnavailable, ShapeError
from sparse_runtime.format.codec import compress_nm, decompress_nm
from sparse_runtime.format.quant import pack_int4
from sparse_runtime.ops import cpu24

if cpu24.unavailable_reason() is not None:
    pytest.skip(f"sparse_runtime._cpu24 is not built: {cpu24.unavailable_reason()}", allow_module_level=True)

ISAS = [pytest.param(i, marks=pytest.mark.skipif(i not in cpu24.isas(), reason=f"this CPU or build has no {i}"))
        for i in ("scalar", "avx2", "avx512", "avx512bf16")]
DTYPES = [torch.float32, torch.bfloat16]
ROOT = Path(__file__).resolve().parents[1]
MS = list(range(1, 34)) + [64, 512]  # 1..16 decode (all row-tile remainders), 17.. prefill
# Odd N leaves row tiles over; K % 32 = 8, 16, 24, 0 (every masked tail); 203 x 512 splits over 2 threads.
SHAPES = [(7, 72), (33, 208), (5, 88), (97, 1000), (203, 512), (16, 64)]


def sparse_weight(n, k, dtype, gen):
    """A random 2:4 weight: (values, meta, dense float64 W)."""
    w = torch.randn(n, k, generator=gen).to(dtype)
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]  # every pair of 4 shows up
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).view(n, k)
    values, meta = compress_nm(w, mask, 2, 4)
    return values, meta, decompress_nm(values, meta, 2, 4, k).double()


def check_close(y, x, w, bias, w_rounding=0.0):
    """y against float64 x @ W^T + bias, with a bound per dtype: fp32 accumulation error, plus bf16 rounding (of
    the output, and by ``w_rounding`` relative of the weight where a path rounds it)."""
    x64 = x.double().reshape(-1, x.shape[-1])
    ref = x64 @ w.T + (0 if bias is None else bias.double())
    scale = x64.abs() @ w.abs().T + (0 if bias is None else bias.double().abs())
    y64 = y.double().reshape(ref.shape)
    assert torch.isfinite(y64).all(), "non-finite output (an element left unwritten?)"
    tol = (1e-5 + w_rounding) * scale + (2.0 ** -8 * ref.abs() if y.dtype == torch.bfloat16 else 0)
    bad = (y64 - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} wrong; first at {bad.nonzero()[0].tolist()}: " \
                          f"{y64[bad][0].item()} vs {ref[bad][0].item()}"


@pytest.fixture(params=[1, 2], ids=lambda t: f"{t}thr")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_matches_float64(isa, dtype, threads):
    gen = torch.Generator().manual_seed(1000 * threads + DTYPES.index(dtype))
    for case, (n, k) in enumerate(SHAPES):
        values, meta, w = sparse_weight(n, k, dtype, gen)
        bias = torch.randn(n, generator=gen).to(dtype)
        for m in MS:
            b = bias if (m + case) % 2 else None
            x = torch.randn(m, k, generator=gen).to(dtype)
            for path in ("",) if m <= 16 else ("",) + cpu24.PATHS:  # beyond decode: the default and each path
                if m % 3 == 0:  # every third call writes into a NaN-poisoned out: each element must be written
                    out = torch.full((m, n), float("nan"), dtype=dtype)
                    assert cpu24.linear(x, values, meta, b, isa=isa, out=out, path=path) is out
                    y = out
                else:
                    y = cpu24.linear(x, values, meta, b, isa=isa, path=path)
                assert y.shape == (m, n) and y.dtype == dtype
                check_close(y, x, w, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_non_contiguous_inputs(isa, dtype):
    gen = torch.Generator().manual_seed(7)
    n, k = 33, 200
    values, meta, w = sparse_weight(n, k, dtype, gen)
    bias = torch.randn(n, generator=gen).to(dtype)
    for m in (1, 5, 16, 40):
        xt = torch.randn(k, m, generator=gen).to(dtype).t()  # a transposed view
        xs = torch.randn(m, k + 24, generator=gen).to(dtype)[:, 8:k + 8]  # a column slice: row stride K + 24
        x3 = torch.randn(2, m, k, generator=gen).to(dtype).transpose(0, 1)  # [m, 2, K], leading dims kept
        for x in (xt, xs, x3):
            assert m == 1 or not x.is_contiguous()  # a [1, K] transpose is contiguous by stride rules
            y = cpu24.linear(x, values, meta, bias, isa=isa)
            assert y.shape == (*x.shape[:-1], n)
            check_close(y, x, w, bias)
    # strided weight tensors too (made contiguous per call: correct, not fast)
    wide_v = torch.cat([values, values], 1)[:, : k // 2]
    wide_m = torch.cat([meta, meta], 1)[:, : k // 8]
    x = torch.randn(3, k, generator=gen).to(dtype)
    check_close(cpu24.linear(x, wide_v, wide_m, bias[::1], isa=isa), x, w, bias)
    x1 = torch.randn(k, generator=gen).to(dtype)  # a 1-D x gives [N]
    y1 = cpu24.linear(x1, values, meta, bias, isa=isa)
    assert y1.shape == (n,)
    check_close(y1, x1, w, bias)


@pytest.mark.parametrize("path", ["panels", "gemm"])
@pytest.mark.parametrize("dtype, m, n", [(torch.float32, 520, 1040), (torch.bfloat16, 17, 2100)], ids=["f32", "bf16"])
@pytest.mark.parametrize("isa", ISAS)
def test_prefill_several_panels(isa, dtype, m, n, path, threads):
    """The prefill paths with W over one 16 MiB dense panel (decompress + GEMM: the panels must tile N exactly, the
    last one partial) and over many sparse-GEMM tasks and blocks of x rows (the last of each partial)."""
    gen = torch.Generator().manual_seed(3)
    k = 4096
    values, meta, w = sparse_weight(n, k, dtype, gen)
    bias = torch.randn(n, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    check_close(cpu24.linear(x, values, meta, bias, isa=isa, out=out, path=path), x, w, bias)


# -- quantized values ---------------------------------------------------------------------------------------
def quant_weight(n, k, scheme, group, dtype, gen):
    """A random 2:4 weight with int8/int4 codes over their whole range and random scales per row (``group`` K) or
    per group of ``group`` columns: (stored codes, meta, scales [N, K/group], dense float64 W = code * scale)."""
    _, meta, _ = sparse_weight(n, k, torch.float32, gen)
    qmax = {"int8": 127, "int4": 7}[scheme]
    codes = torch.randint(-qmax, qmax + 1, (n, k // 2), generator=gen, dtype=torch.int8)
    scales = ((torch.rand(n, k // group, generator=gen) + 0.5) / qmax).to(dtype)
    values = codes.double() * scales.double().repeat_interleave(group // 2, 1)
    stored = pack_int4(codes) if scheme == "int4" else codes
    return stored, meta, scales, decompress_nm(values, meta, 2, 4, k)


# (N, K, group): odd N, K % 64 != 0 with every masked tail (int8 and per-row int4), groups of 32/64/128 columns,
# one group per row, groups the SIMD kernels leave to the scalar one (24, 40), and N*K that 2 threads split.
QUANT_SHAPES = {"int8": [(7, 72, 72), (33, 208, 208), (5, 88, 88), (97, 1000, 1000), (1031, 512, 512)],
                "int4": [(7, 96, 32), (33, 320, 64), (97, 384, 128), (5, 128, 128), (9, 72, 72), (11, 1000, 1000),
                         (13, 120, 24), (3, 160, 40), (1031, 1024, 128)]}
QUANT_MS = list(range(1, 18)) + [33, 64]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_quantized_matches_float64(isa, dtype, scheme, threads):
    """Codes dequantized in registers (streaming) and into the panels (prefill: bf16 rounds the weight) against
    float64 code * scale; every third call writes into a NaN-poisoned out."""
    gen = torch.Generator().manual_seed(100 * threads + 10 * DTYPES.index(dtype) + len(scheme))
    for case, (n, k, group) in enumerate(QUANT_SHAPES[scheme]):
        codes, meta, scales, w = quant_weight(n, k, scheme, group, dtype, gen)
        bias = torch.randn(n, generator=gen).to(dtype)
        for m in QUANT_MS:
            b = bias if (m + case) % 2 else None
            x = torch.randn(m, k, generator=gen).to(dtype)
            for path in ("",) if m <= 16 else cpu24.PATHS:
                out = torch.full((m, n), float("nan"), dtype=dtype) if m % 3 == 0 else None
                y = cpu24.linear(x, codes, meta, b, isa=isa, out=out, path=path, scales=scales)
                assert y.shape == (m, n) and y.dtype == dtype and (out is None or y is out)
                rounding = 2.0 ** -9 if dtype == torch.bfloat16 and path == "panels" else 0.0
                check_close(y, x, w, b, rounding)


@pytest.mark.parametrize("scheme, group", [("int8", 200), ("int4", 40)])
@pytest.mark.parametrize("isa", ISAS)
def test_quantized_non_contiguous_inputs(isa, scheme, group):
    gen = torch.Generator().manual_seed(8)
    n, k = 33, 200
    codes, meta, scales, w = quant_weight(n, k, scheme, group, torch.float32, gen)
    bias = torch.randn(n, generator=gen)
    for m in (1, 5, 40):
        xt = torch.randn(k, m, generator=gen).t()
        xs = torch.randn(m, k + 24, generator=gen)[:, 8:k + 8]
        for x in (xt, xs):
            check_close(cpu24.linear(x, codes, meta, bias, isa=isa, scales=scales), x, w, bias)
    x = torch.randn(3, k, generator=gen)  # strided scales and codes: made contiguous per call
    wide_s = torch.cat([scales, scales], 1)[:, :scales.shape[1]]
    wide_c = torch.cat([codes, codes], 1)[:, :codes.shape[1]]
    check_close(cpu24.linear(x, wide_c, meta, bias, isa=isa, scales=wide_s), x, w, bias)


def test_isas_match_the_cpu():
    found = cpu24.isas()
    assert found[0] == "scalar" and len(set(found)) == len(found)
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "flags" not in cpuinfo.read_text():
        pytest.skip("no /proc/cpuinfo flags to compare with")
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.M).group(1).split())
    assert ("avx2" in found) == ({"avx2", "fma"} <= flags)
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}
    assert ("avx512" in found) == (avx512 <= flags)
    assert ("avx512bf16" in found) == (avx512 | {"avx512_bf16"} <= flags)


def test_unknown_isa_is_refused():
    values, meta, _ = sparse_weight(8, 64, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="isa 'avx9'.*available: scalar"):
        cpu24.linear(torch.randn(1, 64), values, meta, isa="avx9")


def test_kernels_use_torchs_threads(threads):
    """The kernels' at::parallel_for runs on torch's threads (built without OpenMP it silently runs on one)."""
    assert cpu24.parallel_for_threads() == threads


def test_unknown_path_is_refused():
    values, meta, _ = sparse_weight(8, 64, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="path must be '', 'stream', 'panels' or 'gemm', got 'dense'"):
        cpu24.linear(torch.randn(20, 64), values, meta, path="dense")


def test_read_bandwidth_probe(threads):
    buf = torch.ones((1 << 20) + 3)
    assert cpu24.read_bandwidth_probe(buf) == buf.numel()


def test_build_keeps_isa_code_apart(tmp_path):
    """Each ISA's TU gets its own -m flags and includes no torch header (an inline function instantiated with
    AVX-512 code must not become the copy other TUs link to); the torch-facing TU has no -m flags."""
    sys.path.insert(0, str(ROOT / "csrc"))
    import build_config
    cfg, why = build_config.cpu_config()
    if cfg is None:
        pytest.skip(why)
    text = build_config.build_ninja_cpu(cfg, tmp_path, tmp_path / "_cpu24.so")
    for src, flags in build_config.CPU_SOURCES["_cpu24"]:
        rule = text[text.index(f"csrc/{src}"):].split("\n")[1]
        if flags == "torch":
            assert not re.search(r"\s-m", rule), rule
        else:
            assert rule.endswith(flags)
            code = (ROOT / "csrc" / src).read_text()
            assert not re.search(r"#include [<\"](torch|ATen|c10|pybind11)", code), src
    assert "-lc10 -ltorch -ltorch_cpu -ltorch_python" in text and "-Wl,-rpath," in text


def test_streaming_kernels_prefetch_their_streams():
    """The built decode kernels issue their software prefetches for every kind of values (csrc/cpu24.h
    cpu24_steps): GCC deletes calls to a helper that does nothing but prefetch, which once left the build with
    none, every streaming number then measured without them."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump to read the extension with")
    if not {"avx2", "avx512"} & set(cpu24.isas()):
        pytest.skip("the scalar kernel does not prefetch")
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", cpu24._E.__file__], check=True,
                          capture_output=True, text=True).stdout
    kinds, prefetching = set(), set()
    for body in re.split(r"\n(?=[0-9a-f]+ <)", text):
        name = re.match(r"[0-9a-f]+ <(.*)>:", body)
        kind = name and re.search(r"(tile|schedule_rows)<.*\(Cpu24Values\)(\d)", name.group(1))
        if kind:
            kinds.add(kind.group(2))
            if "prefetcht0" in body:
                prefetching.add(kind.group(2))
    if not kinds:
        pytest.skip("the extension's symbols are stripped")
    assert prefetching == kinds == {"0", "1", "2", "3"}


def test_valid_calls_skip_the_wrappers_checks(monkeypatch, weight):
    # The extension checks every call; the friendlier Python checks cost more than a decode-sized kernel, so they
    # run only once the extension refuses.
    values, meta = weight
    x = torch.randn(2, 72)
    expected = cpu24.linear(x, values, meta)
    calls = []
    monkeypatch.setattr(cpu24, "_check", lambda *a: calls.append(a))  # a _check that finds nothing wrong
    torch.testing.assert_close(cpu24.linear(x, values, meta), expected, rtol=0, atol=0)
    assert calls == []
    with pytest.raises(ValueError, match="cpu24: shapes do not match"):  # the extension's own refusal
        cpu24.linear(torch.randn(2, 64), values, meta)
    assert len(calls) == 1


# -- bad inputs -------------------------------------------------------------------------------------------
@pytest.fixture
def weight():
    values, meta, _ = sparse_weight(9, 72, torch.float32, torch.Generator().manual_seed(1))
    return values, meta


def test_wrong_dtypes(weight):
    values, meta = weight
    x = torch.randn(2, 72)
    with pytest.raises(TypeError, match="supported: torch.float32, torch.bfloat16"):
        cpu24.linear(x.half(), values.half(), meta)
    with pytest.raises(TypeError, match="x is torch.bfloat16 but values is torch.float32"):
        cpu24.linear(x.bfloat16(), values, meta)
    with pytest.raises(TypeError, match="bias is torch.float64"):
        cpu24.linear(x, values, meta, torch.zeros(9, dtype=torch.float64))
    with pytest.raises(TypeError, match="meta must be torch.uint8"):
        cpu24.linear(x, values, meta.to(torch.int32))


def test_wrong_shapes(weight):
    values, meta = weight
    x = torch.randn(2, 72)
    with pytest.raises(ShapeError, match=r"x \(2, 64\) must end in K=72"):
        cpu24.linear(torch.randn(2, 64), values, meta)
    with pytest.raises(ShapeError, match=r"meta must be \[N, K/8\] = \[9, 9\], got \[9, 10\]"):
        cpu24.linear(x, values, torch.zeros(9, 10, dtype=torch.uint8))
    with pytest.raises(ShapeError, match=r"meta must be \[N, K/8\]"):
        cpu24.linear(x, values, meta[:8])
    with pytest.raises(ShapeError, match=r"bias must be \[N\] = \[9\], got \[8\]"):
        cpu24.linear(x, values, meta, torch.zeros(8))
    with pytest.raises(ShapeError, match="K=1004 .* must be a positive multiple of 8"):
        cpu24.linear(torch.randn(1, 1004), torch.zeros(9, 502), torch.zeros(9, 126, dtype=torch.uint8))
    with pytest.raises(ShapeError, match="K=0 .* positive multiple of 8"):
        cpu24.linear(torch.randn(1, 0), torch.zeros(9, 0), torch.zeros(9, 0, dtype=torch.uint8))
    with pytest.raises(ShapeError, match="values must be 2-D"):
        cpu24.linear(x, values.flatten(), meta)
    with pytest.raises(ShapeError, match="out must be a contiguous"):
        cpu24.linear(x, values, meta, out=torch.empty(2, 8))
    with pytest.raises(ShapeError, match="out must be a contiguous"):
        cpu24.linear(x, values, meta, out=torch.empty(9, 2).t())


def test_non_cpu_tensors(weight):
    values, meta = weight
    x = torch.randn(2, 72)
    for args in ((x.to("meta"), values, meta), (x, values.to("meta"), meta), (x, values, meta.to("meta"))):
        with pytest.raises(BackendUnavailable, match="CPU tensors only; .* is on meta"):
            cpu24.linear(*args)
    with pytest.raises(BackendUnavailable, match="bias is on meta"):
        cpu24.linear(x, values, meta, torch.zeros(9, device="meta"))


@pytest.fixture
def qweight():
    codes, meta, scales, _ = quant_weight(9, 128, "int4", 64, torch.float32, torch.Generator().manual_seed(2))
    return codes, meta, scales


def test_quantized_bad_inputs(qweight, weight):
    codes, meta, scales = qweight
    x = torch.randn(2, 128)
    with pytest.raises(TypeError, match=r"uint8 codes but no scales"):
        cpu24.linear(x, codes, meta)
    with pytest.raises(TypeError, match=r"int8 codes \(int8\) or packed int4 codes \(uint8\), got torch.float32"):
        cpu24.linear(torch.randn(2, 72), weight[0], weight[1], scales=torch.ones(9, 1))
    with pytest.raises(TypeError, match=r"int8 codes .* got torch.int32"):
        cpu24.linear(x, codes.int(), meta, scales=scales)
    with pytest.raises(TypeError, match=r"scales dtype torch.float16 is not supported"):
        cpu24.linear(x, codes, meta, scales=scales.half())
    with pytest.raises(TypeError, match=r"x is torch.bfloat16 but scales is torch.float32"):
        cpu24.linear(x.bfloat16(), codes, meta, scales=scales)
    with pytest.raises(TypeError, match=r"bias is torch.bfloat16 but scales is torch.float32"):
        cpu24.linear(x, codes, meta, torch.zeros(9, dtype=torch.bfloat16), scales=scales)
    with pytest.raises(ShapeError, match=r"x \(2, 64\) must end in K=128"):  # int4: K = 4 * codes' columns
        cpu24.linear(torch.randn(2, 64), codes, meta, scales=scales)
    for bad in (scales[:8], scales[:, :1].flatten(), torch.ones(9, 3), torch.ones(9, 32), torch.ones(9, 0)):
        with pytest.raises(ShapeError, match=r"scales must be \[N, groups\] = \[9, groups\]"):
            cpu24.linear(x, codes, meta, scales=bad)
    with pytest.raises(BackendUnavailable, match="scales is on meta"):
        cpu24.linear(x, codes, meta, scales=scales.to("meta"))


def test_the_op_refuses_bad_quantized_inputs_itself(qweight):
    """Past the wrapper (a direct op call), the C++ checks keep the kernel in bounds."""
    codes, meta, scales = qweight
    op, x = torch.ops.sparse_runtime.cpu24_linear, torch.randn(2, 128)
    with pytest.raises(ValueError, match="int8/int4 codes need scales"):
        op(codes, meta, None, x)
    with pytest.raises(ValueError, match=r"scales must be \[N, groups\]"):
        op(codes, meta, None, x, "", "", torch.ones(9, 3))
    with pytest.raises(TypeError, match="scales and x dtypes differ"):
        op(codes, meta, None, x, "", "", scales.bfloat16())


# -- torch.library / torch.compile ------------------------------------------------------------------------
def test_custom_op_opcheck(weight):
    values, meta = weight
    args = (values, meta, torch.randn(9), torch.randn(3, 72))
    torch.library.opcheck(torch.ops.sparse_runtime.cpu24_linear.default, args)
    torch.library.opcheck(torch.ops.sparse_runtime.cpu24_linear.default, (values, meta, None, torch.randn(2, 4, 72)))


def test_custom_op_opcheck_quantized(qweight):
    codes, meta, scales = qweight
    args = (codes, meta, torch.randn(9), torch.randn(3, 128), "", "", scales)
    torch.library.opcheck(torch.ops.sparse_runtime.cpu24_linear.default, args)


class _Tiny(torch.nn.Module):
    def __init__(self, values, meta, bias, scales=None):
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.register_buffer("bias", bias)
        self.register_buffer("scales", scales)

    def forward(self, x):
        return torch.relu(cpu24.linear(x * 2, self.values, self.meta, self.bias, scales=self.scales)) - 1


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here")
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int4"])
def test_torch_compile_inductor(weight, qweight, quantized):
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    values, meta = weight
    mod = _Tiny(*qweight[:2], torch.randn(9), qweight[2]) if quantized else _Tiny(values, meta, torch.randn(9))
    compiled = torch.compile(mod, backend="inductor", fullgraph=True)
    for m in (1, 20):
        x = torch.randn(m, 128 if quantized else 72)
        y, code = run_and_get_code(compiled, x)
        assert "sparse_runtime.cpu24_linear" in "".join(code)  # the op sits in the compiled graph
        torch.testing.assert_close(y, mod(x), rtol=1e-5, atol=1e-5)
