"""The mma.sp fragment layout and the CPU emulator of csrc/mmasp.cu against float64 dense products."""
import math
import re
from pathlib import Path

import pytest
import torch

import mmasp_emulator
from sparse_runtime.ops import mmasp_layout as L
from sparse_runtime.format.codec import SparseWeight
from sparse_runtime.format.masks import nm_mask

ROOT = Path(__file__).resolve().parents[1]
CU = (ROOT / "csrc" / "mmasp.cu").read_text()


def case(m, n, k, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    sw = SparseWeight.compress(w, nm_mask(w.float().abs()))
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ref = x.double() @ sw.to_dense().double().T + (0 if b is None else b.double())
    return sw, x, b, ref


@pytest.mark.parametrize("m, n, k, split_chunks, dtype", [
    (1, 16, 64, 1, torch.float16),
    (5, 37, 192, 1, torch.bfloat16),  # N not a multiple of 16: padded rows, masked stores
    (8, 24, 128, 1, torch.float16),  # the last M with one n-tile
    (9, 40, 320, 2, torch.float16),  # two n-tiles; 5 chunks in CTAs of 2: a short last split
    (13, 130, 256, 3, torch.bfloat16),  # more rows than one CTA (128); 4 chunks in CTAs of 3
    (16, 17, 64, 1, torch.float16),
])
def test_emulator_matches_float64_reference(m, n, k, split_chunks, dtype):
    sw, x, b, ref = case(m, n, k, dtype, seed=m * 1000 + n)
    vals, meta = L.fragment_layout(sw.values, sw.meta, k)
    assert vals.shape == (math.ceil(n / 16), k // 32, 32, 4) and meta.shape == (math.ceil(n / 16), k // 64, 32)
    y = mmasp_emulator.emulate(x, vals, meta, n, k, b, split_chunks)
    assert y.shape == (m, n)
    # float64 throughout: a misplaced value, index or token is an O(1) error, rounding is ~1e-13
    assert (y - ref).abs().max().item() <= 1e-9 * (1 + ref.abs().max().item())


def test_a_wrong_selector_is_caught():
    """The emulator is sensitive to the layout: the metadata words of the two lane pairs swapped (what a kernel
    with the selectors the wrong way round would read) give a wrong product."""
    sw, x, b, ref = case(4, 32, 128, torch.float16, seed=1)
    vals, meta = L.fragment_layout(sw.values, sw.meta, 128)
    lane = torch.arange(32)
    swapped = meta[..., lane ^ 2]
    y = mmasp_emulator.emulate(x, vals, swapped, 32, 128, b, 1)
    assert (y - ref).abs().max().item() > 1e-2


def test_padded_rows_hold_valid_increasing_indices():
    sw, *_ = case(1, 20, 64, torch.float16, seed=2, bias=False)
    vals, meta = L.fragment_layout(sw.values, sw.meta, 64)
    # rows 20..31 of tile 1 are padding: lanes with groupID >= 4 hold rows 20.. in bits 0..15, all of them rows
    # 24.. in bits 16..31; zero values, nibbles 0b0100 (kept indices 0 and 1)
    assert (vals[1, :, 16:, 0] == 0).all() and (vals[1, :, :, 1] == 0).all()
    assert ((meta[1, :, :] >> 16) & 0xFFFF == 0x4444).all()
    assert ((meta[1, :, 16:] & 0xFFFF) == 0x4444).all()


def test_layout_refuses_what_the_kernel_cannot_take():
    for n, k in ((16, 96), (16, 32), (16, 0), (0, 64)):
        assert L.unsupported_shape(n, k)
    with pytest.raises(ValueError, match="multiple of 64"):
        L.fragment_layout(torch.zeros(16, 48, dtype=torch.float16), torch.zeros(16, 12, dtype=torch.uint8), 96)
    with pytest.raises(ValueError, match="16-bit values"):
        L.fragment_layout(torch.zeros(16, 32), torch.zeros(16, 8, dtype=torch.uint8), 64)
    with pytest.raises(ValueError, match="M must be"):
        mmasp_emulator.emulate(torch.zeros(17, 64, dtype=torch.float16), *L.fragment_layout(
            torch.zeros(16, 32, dtype=torch.float16), torch.full((16, 8), 0x44, dtype=torch.uint8), 64), 16, 64, None, 1)


def test_every_mirrored_expression_is_in_the_emulator():
    """The CUDA source tags its index arithmetic with '// mirror: expr[, expr]'; the emulator must state each."""
    src = Path(mmasp_emulator.__file__).read_text()
    tags = re.findall(r"// mirror: (.+)", CU)
    assert len(tags) >= 6
    for tag in tags:
        for expr in tag.split(", "):
            assert expr.strip() in src, f"mmasp.cu mirrors {expr!r}, which mmasp_emulator.py does not state"


def test_constants_match_the_cuda_header():
    header = (ROOT / "csrc" / "mmasp.h").read_text()
    assert int(re.search(r"#define SR_MMASP_WARPS (\d+)", header).group(1)) == L.WARPS
    assert int(re.search(r"#define SR_MMASP_MAX_KS (\d+)", header).group(1)) == L.MAX_SPLIT_COLUMNS
    assert f"K_CHUNK = {L.K_CHUNK};" in CU
    assert f"m > {L.DECODE_MAX_M})" in CU  # the kernel's M limit is the project's decode limit


LLAMA3_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def smem_limited(ctas_by_registers, smem_per_sm):
    """An occupancy like cudaOccupancyMaxActiveBlocksPerMultiprocessor's: registers cap it, and so does the x
    slice of the M > 8 variant (16 rows x (columns + 8) halves) in the SM's shared memory."""
    return lambda per: min(ctas_by_registers, smem_per_sm // (16 * (per * L.K_CHUNK + 8) * 2))


@pytest.mark.parametrize("sms, occupancy", [(132, lambda per: 3), (132, smem_limited(3, 228 << 10)),
                                            (108, lambda per: 3), (108, smem_limited(3, 164 << 10)),
                                            (132, lambda per: 2), (132, lambda per: 1)])
@pytest.mark.parametrize("n, k", [*LLAMA3_8B, (48, 64), (128256, 4096)])
def test_split_fills_one_wave(n, k, sms, occupancy):
    per = L.split_columns(n, k, sms, occupancy)
    ctas_n, split = L.grid(n, k, per)
    assert 1 <= per * L.K_CHUNK <= L.MAX_SPLIT_COLUMNS and (split - 1) * per < k // L.K_CHUNK <= split * per
    most = min(k // L.K_CHUNK, L.MAX_SPLIT_COLUMNS // L.K_CHUNK)
    # one wave at the given occupancy, unless even the largest slice needs a second
    one_wave = ctas_n * split <= occupancy(per) * sms
    assert one_wave or per == most
    # aimed at 2 CTAs (16 warps) per SM; whole chunks per CTA round that down, never below 1.5 CTAs (12 warps),
    # unless each CTA already takes the fewest columns or the most it can hold, or one chunk less would need a
    # second wave
    assert ctas_n * split >= 1.5 * sms or per in (1, most) or \
        ctas_n * L.grid(n, k, per - 1)[1] > occupancy(per - 1) * sms


def test_llama3_8b_shapes_run_in_one_wave_on_h100():
    """Every Llama-3-8B linear at M <= 16 in one wave on 132 SMs where the M > 8 variant keeps 3 CTAs per SM (80
    registers a thread): the old 1024-column cap gave 448 CTAs (1.13 waves) on 14336x4096 and 4096x14336."""
    for n, k in LLAMA3_8B:
        ctas_n, split = L.grid(n, k, L.split_columns(n, k, 132, lambda per: 3))
        assert ctas_n * split <= 3 * 132, (n, k, ctas_n * split)
        assert ctas_n * split >= 1.5 * 132  # and still about 2 CTAs per SM or more


def test_a100_needs_a_second_wave_only_where_no_slice_fits():
    """108 SMs x 3: 14336x4096 has 112 CTAs along N, so even the largest slice (3 along K) makes 336 > 324."""
    per = L.split_columns(14336, 4096, 108, lambda per: 3)
    assert per * L.K_CHUNK == L.MAX_SPLIT_COLUMNS and L.grid(14336, 4096, per) == (112, 3)


def test_the_slice_grows_only_as_far_as_one_wave_needs():
    """4096x4096 on 132 SMs at 1 CTA per SM: 8 chunks a CTA (the 2-per-SM aim) make 256 CTAs; 16 make 128, the
    most CTAs one wave holds (and larger slices would only leave SMs idle)."""
    per = L.split_columns(4096, 4096, 132, lambda per: 1)
    assert per == 16 and L.grid(4096, 4096, per) == (32, 4)
