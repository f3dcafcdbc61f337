"""The pure logic of benchmarks.kernels (parsing, the byte model against the tensors a call reads, output files)
and the ``sparse-runtime bench`` command that runs it."""
import json
import sys

import pytest
import torch

from benchmarks import common
from benchmarks import kernels as kb
from sparse_runtime.cli import bench, main
from sparse_runtime.format.codec import SparseWeight
from sparse24_cases import random_mask, random_rotation


def test_parse_shapes():
    assert common.parse_shapes("4096x4096, 1024X4096") == [(4096, 4096), (1024, 4096)]
    for bad, match in [("4096", "NxK"), ("ax3", "NxK"), ("40x42", "multiple of 4"), ("0x8", "positive")]:
        with pytest.raises(ValueError, match=match):
            common.parse_shapes(bad)


def test_parse_ints_and_choices():
    assert common.parse_ints("1,16,8192") == [1, 16, 8192]
    with pytest.raises(ValueError, match="integers"):
        common.parse_ints("1,x")
    with pytest.raises(ValueError, match="positive"):
        common.parse_ints("0")
    assert kb.parse_choices("fp16", kb.DTYPES, "--dtypes") == ["fp16"]
    with pytest.raises(ValueError, match="unknown fp8"):
        kb.parse_choices("fp16,fp8", kb.DTYPES, "--dtypes")


@pytest.mark.parametrize("n,k", [(40, 256), (24, 44)])  # K/4 odd: a half-filled last meta byte
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_byte_model_counts_the_bytes_of_the_tensors_a_call_reads(n, k, dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(dtype)
    sw = SparseWeight.compress(w, random_mask(n, k, gen))
    elem, m = w.element_size(), 16
    x, y = torch.empty(m, k, dtype=dtype), torch.empty(m, n, dtype=dtype)
    assert kb.weight_bytes("dense", n, k, elem) == w.nbytes
    assert kb.weight_bytes("triton", n, k, elem) == sw.values.nbytes + sw.meta.nbytes
    for provider in kb.ROTATION_PROVIDERS:
        block = kb.ROTATION_PROVIDERS[provider][0]
        rotation = random_rotation(k, block, dtype, seed=1) if not block or k % block == 0 else None
        if rotation is not None:
            assert kb.rotation_bytes(provider, k, elem) == rotation.nbytes, provider
            assert kb.call_bytes(provider, m, n, k, elem) == (sw.values.nbytes + sw.meta.nbytes + rotation.nbytes
                                                              + x.nbytes + y.nbytes), provider
    assert kb.rotation_bytes("cusparselt", k, elem) == 0
    assert kb.call_bytes("dense", m, n, k, elem) == w.nbytes + x.nbytes + y.nbytes
    assert kb.call_flops(m, n, k) == 2 * m * n * k


def test_make_row_and_copies():
    row = kb.make_row("triton", (4096, 4096), "fp16", 1, 0.01, 0.016, 3000.0)
    assert row["layer"] == "q/o_proj" and row["speedup_vs_dense"] == pytest.approx(1.6)
    assert row["GBps"] == pytest.approx(row["bytes"] / 1e-5 / 1e9)
    assert row["pct_copy_bw"] == pytest.approx(100 * row["GBps"] / 3000)
    assert row["TFLOPs"] == pytest.approx(2 * 4096 * 4096 / 1e-5 / 1e12)
    assert kb.make_row("dense", (8, 8), "bf16", 1, 1.0, None, None)["speedup_vs_dense"] is None
    assert kb.copies_needed(10 << 20, 50 << 20) == 15
    assert kb.copies_needed(1 << 30, 50 << 20) == 1
    assert kb.copies_needed(1, 50 << 20) == 64


def test_select_providers():
    avail = {"cusparselt": None, "triton": None, "torch": "no", "reference": None}
    assert kb.select_providers(avail) == ["dense", "cusparselt", "triton", *kb.ROTATION_PROVIDERS]
    assert kb.select_providers({"reference": None, "triton": "no GPU"}) == ["dense"]
    assert kb.select_providers(avail, ["dense", "triton"]) == ["dense", "triton"]
    with pytest.raises(ValueError, match="unknown cublas"):
        kb.select_providers(avail, ["cublas"])
    with pytest.raises(ValueError, match="torch: no"):
        kb.select_providers(avail, ["torch"])


def test_json_plot_and_table(tmp_path):
    rows = [kb.make_row(p, (1024, 4096), "fp16", m, t, 0.02, 3000.0)
            for m in (1, 16) for p, t in (("dense", 0.02), ("triton", 0.012), ("triton:fused-rot-b128", 0.0125))]
    path = common.write_json(tmp_path / "r" / "k.json", {"device": "test", "settings": {"ms": [1, 16]}, "rows": rows})
    data = json.loads(path.read_text())
    assert [p.name for p in path.parent.iterdir()] == ["k.json"]  # the temporary file was renamed onto it
    assert data["device"] == "test" and data["rows"] == rows
    png = kb.plot(tmp_path / "k.png", rows, "title")
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = kb.format_table(rows)
    assert "triton:fused-rot-b128" in table and "1.67" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cli_without_cuda_times_the_cpu_kernels(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bench kernels times it")
    assert main(["bench", "kernels", "--shapes", "32x64", "--ms", "2", "--out", str(tmp_path)]) == 0
    assert "timing the CPU kernels" in capsys.readouterr().err
    rows = json.loads((tmp_path / "cpu_kernels_fp32.json").read_text())["rows"]
    assert {(x["shape"], x["m"], x["provider"]) for x in rows} == {("32x64", 2, "dense"), ("32x64", 2, "cpu24")}
    assert main(["bench", "kernels", "--dtypes", "fp16", "--shapes", "32x64"]) == 2  # no CPU kernel takes fp16
    assert "fp16" in capsys.readouterr().err
    assert main(["bench", "kernels", "--shapes", "4096"]) == 2
    assert "NxK" in capsys.readouterr().err
    assert main(["bench"]) == 2
    assert "name a suite: kernels, prefill" in capsys.readouterr().err
    assert main(["bench", "prefill", "--m", "512"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_outside_a_checkout_says_how_to_run_it(capsys, monkeypatch):
    assert bench.load_suite("kernels") is kb  # the checkout's own module, imported, not executed from a path
    monkeypatch.setitem(sys.modules, "benchmarks", None)  # as where only the installed package exists
    monkeypatch.setitem(sys.modules, "benchmarks.kernels", None)
    assert bench.load_suite("kernels") is None
    assert main(["bench", "kernels", "--ms", "1"]) == 2
    assert "python -m benchmarks.kernels" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_runs_on_a_gpu(tmp_path):
    assert main(["bench", "kernels", "--shapes", "1024x4096", "--ms", "1,64", "--dtypes", "fp16",
                 "--providers", "dense,triton,triton:fused-rot-b128", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("*.json")
    rows = json.loads(js.read_text())["rows"]
    assert {r["provider"] for r in rows} == {"dense", "triton", "triton:fused-rot-b128"}
    assert list(tmp_path.glob("*.png"))


@pytest.mark.gpu
def test_bench_prefill_runs_on_a_gpu(tmp_path):
    assert main(["bench", "prefill", "--m", "512", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("prefill-*.json")
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 3 and all(r["dense_us"] > 0 and r["cusparselt_speedup"] > 0 for r in rows)
    assert list(tmp_path.glob("prefill-*.png"))


def test_provider_callables_agree_on_the_interpreter():
    # The GPU glue (one callable per weight/input copy) runs on the CPU too, through the interpreter.
    from sparse24_cases import random_layer, random_rotation

    sws = [random_layer(40, 128, torch.float32, seed=s)[0] for s in (1, 2)]
    xs = [torch.randn(3, 128) for _ in sws]
    results = {}
    for provider in ["dense", "triton", "reference", *kb.ROTATION_PROVIDERS]:
        block = kb.ROTATION_PROVIDERS.get(provider, (None,))[0]
        rots = [random_rotation(128, block, torch.float32, seed=9)] * len(sws)
        results[provider] = [f() for f in kb._layer_fns(provider, sws, xs, rots)]
    dense = [x @ sw.to_dense().T for sw, x in zip(sws, xs)]
    for provider, ys in results.items():
        block = kb.ROTATION_PROVIDERS.get(provider, (None,))[0]
        if provider in kb.ROTATION_PROVIDERS:  # fused and rotate-first alike, against (x @ R) @ W^T by hand
            r = random_rotation(128, block, torch.float32, seed=9)
            r = torch.block_diag(*r) if r.dim() == 3 else r
            refs = [(x @ r) @ sw.to_dense().T for sw, x in zip(sws, xs)]
        else:
            refs = dense
        for y, ref in zip(ys, refs):
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
