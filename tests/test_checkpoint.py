import copy
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_runtime import SparseLinear, load_pretrained, save_pretrained, sparsify
from sparse_runtime.models.checkpoint import SPARSE_CONFIG
from sparse_runtime.models.tensor_files import INDEX, WEIGHTS
from sparse_runtime.errors import CheckpointError
from sparse_runtime.format.quant import QuantScheme, fake_quantize

from helpers import masked_dense_copy, tiny_model, write_shards


@pytest.fixture(scope="module")
def stories(stories_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    tok = AutoTokenizer.from_pretrained(stories_dir)
    return model, tok


@pytest.fixture()
def saved(stories, tmp_path):
    model, tok = stories
    sparse = AutoModelForCausalLM.from_pretrained(model.config._name_or_path).eval()
    sparsify(sparse, backend="reference")  # bit-exact against the masked dense model
    out = save_pretrained(sparse, tmp_path / "ckpt", tokenizer=tok)
    return sparse, out


def test_stories_logits_bitwise_equal_after_reload(stories, saved):
    model, tok = stories
    sparse, path = saved
    dense = masked_dense_copy(model, sparse)
    ids = tok("Once upon a time there was a", return_tensors="pt").input_ids
    loaded = load_pretrained(path, backend="reference")
    with torch.no_grad():
        ref, a, b = dense(ids).logits, sparse(ids).logits, loaded(ids).logits
    assert torch.equal(a, ref)
    assert torch.equal(b, ref)
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 35
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied weights re-tied
    assert AutoTokenizer.from_pretrained(path)("hi").input_ids == tok("hi").input_ids


def test_checkpoint_contents(stories, saved):
    sparse, path = saved
    names = set(os.listdir(path))
    assert {"config.json", WEIGHTS, SPARSE_CONFIG, "tokenizer.json"} <= names
    sc = json.loads((path / SPARSE_CONFIG).read_text())
    q = sc["layers"]["model.layers.0.self_attn.q_proj"]
    assert q["pattern"] == "2:4" and q["in_features"] == 64 and q["sparsity"] == 0.5
    tensors = load_file(path / WEIGHTS)
    assert tensors["model.layers.0.self_attn.q_proj.weight_values"].shape == (64, 32)
    assert tensors["model.layers.0.self_attn.q_proj.weight_meta"].dtype == torch.uint8
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    # the compressed file is smaller than the dense model's
    dense_bytes = sum(p.numel() * p.element_size() for p in stories[0].parameters())
    assert os.path.getsize(path / WEIGHTS) < 0.7 * dense_bytes


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma", "bert"])
def test_other_families_round_trip(family, tmp_path):
    model = tiny_model(family)
    sparsify(model, pattern="2:4")
    save_pretrained(model, tmp_path / family)
    loaded = load_pretrained(tmp_path / family)
    assert type(loaded) is type(model)
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])


def test_mixed_patterns_and_rotation_round_trip(tmp_path):
    model = tiny_model("llama")
    sparsify(model, targets=["q_proj"], pattern="4:8")
    sparsify(model, targets=["up_proj"], pattern="unstructured", sparsity=0.7)
    sparsify(model, targets=["down_proj"])
    q, _ = torch.linalg.qr(torch.randn(4, 32, 32))
    model.model.layers[0].mlp.down_proj.set_rotation(q)
    save_pretrained(model, tmp_path / "mixed")
    sc = json.loads((tmp_path / "mixed" / SPARSE_CONFIG).read_text())
    assert sc["layers"]["model.layers.0.self_attn.q_proj"]["pattern"] == "4:8"
    assert sc["layers"]["model.layers.1.mlp.up_proj"]["sparsity"] == pytest.approx(0.7, abs=0.02)
    assert sc["layers"]["model.layers.0.mlp.down_proj"]["rotation"] == [4, 32, 32]
    loaded = load_pretrained(tmp_path / "mixed")
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_to_dtype(saved):
    sparse, path = saved
    loaded = load_pretrained(path, dtype=torch.bfloat16)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.weight_values.dtype == torch.bfloat16 and layer.weight_meta.dtype == torch.uint8
    want, got = sparse.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for k, t in want.items():  # the values, not only the dtypes: each the saved tensor rounded to bf16
        assert got[k].dtype == (torch.bfloat16 if t.is_floating_point() else t.dtype), k
        assert torch.equal(got[k], t.to(got[k].dtype)), k


def test_save_is_atomic_when_interrupted(saved, monkeypatch):
    sparse, path = saved
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    import sparse_runtime.models.checkpoint as ck

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(sparse, path)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    load_pretrained(path)


# Loads stories260K, 2:4-sparsifies it once, then for each "DELAY EXCHANGE" line forks a writer that saves it over
# the checkpoint again and again (flipping the final norm's sign each time, so saves alternate between two models)
# and SIGKILLs it after DELAY seconds. EXCHANGE 0: the two-rename fallback instead of renameat2.
KILLED_WRITERS = r"""
import os, signal, sys, time
import torch
torch.set_num_threads(1)  # no worker threads in the process that forks
from transformers import AutoModelForCausalLM
import sparse_runtime as sr
from sparse_runtime.models import saving
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
model.config._name_or_path = ""  # no tokenizer to save
sr.sparsify(model)
print("ready", flush=True)
for line in sys.stdin:
    delay, exchange = line.split()
    pid = os.fork()
    if pid == 0:
        if exchange == "0":
            saving._RENAMEAT2 = None
        while True:
            with torch.no_grad():
                model.model.norm.weight.neg_()
            sr.save_pretrained(model, sys.argv[2])
    time.sleep(float(delay))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print("killed", flush=True)
"""


def test_killed_saves_leave_the_old_or_the_new_checkpoint_and_no_debris(stories_dir, tmp_path, one_thread):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    sparsify(model, backend="reference")  # compared bit for bit with reloads on reference
    path = save_pretrained(model, tmp_path / "ckpt")
    ids = torch.tensor([[1, 403, 407, 261, 378, 10]])
    with torch.no_grad():
        old = model(ids).logits
        model.model.norm.weight.neg_()
        new = model(ids).logits
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = subprocess.Popen([sys.executable, "-c", KILLED_WRITERS, str(stories_dir), str(path)], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writers.stdout.readline() == "ready\n"
        rng, seen = random.Random(0), set()
        for i in range(20):
            writers.stdin.write(f"{rng.uniform(0, 0.15):.4f} {i % 2}\n")
            writers.stdin.flush()
            assert writers.stdout.readline() == "killed\n"
            with torch.no_grad():
                got = load_pretrained(path, backend="reference")(ids).logits
            assert torch.equal(got, old) or torch.equal(got, new), f"kill {i}: neither the old nor the new model"
            seen.add(torch.equal(got, new))
    finally:
        writers.kill()
        writers.wait()
    assert seen == {False, True}  # the kills landed while saves were being made
    save_pretrained(model, path)
    assert os.listdir(tmp_path) == ["ckpt"]  # the dead writers' temporary and displaced folders are gone


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_a_save_killed_between_its_two_renames_is_put_back(saved):
    sparse, path = saved
    dead = _dead_pid()
    os.rename(path, path.with_name(f".{path.name}.old-{dead}"))  # the fallback's state between its renames
    (path.parent / f".{path.name}.tmp-{dead}-x").mkdir()  # the new folder it was writing
    live = path.parent / f".{path.name}.tmp-{os.getpid()}-y"  # a running writer's
    live.mkdir()
    load_pretrained(path)
    assert path.is_dir() and not path.with_name(f".{path.name}.old-{dead}").exists()
    save_pretrained(sparse, path)
    assert sorted(os.listdir(path.parent)) == sorted(["ckpt", live.name])


def _edit_tensors(path, fn):
    tensors = load_file(path / WEIGHTS)
    fn(tensors)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})


def _edit_config(path, fn):
    sc = json.loads((path / SPARSE_CONFIG).read_text())
    fn(sc)
    (path / SPARSE_CONFIG).write_text(json.dumps(sc))


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("corrupt,match", [
    (lambda p: _edit_tensors(p, lambda t: t.pop(f"{Q}.weight_meta")), "missing"),
    (lambda p: _edit_tensors(p, lambda t: t.update(extra=torch.zeros(1))), "unexpected"),
    (lambda p: _edit_tensors(p, lambda t: t[f"{Q}.weight_values"].__setitem__((0, 0), float("nan"))), "NaN"),
    (lambda p: _edit_tensors(p, lambda t: t[f"{Q}.weight_meta"].__setitem__((1, 0), 0)), "strictly increasing"),
    (lambda p: _edit_config(p, lambda c: c["layers"][Q].update(in_features=32)), "checkpoint says 64x32"),
    (lambda p: _edit_config(p, lambda c: c["layers"].update({"model.norm": c["layers"][Q]})), "not nn.Linear"),
    (lambda p: _edit_config(p, lambda c: c["layers"].update({"model.zzz": c["layers"][Q]})), "not a module"),
    (lambda p: _edit_config(p, lambda c: c["layers"][Q].pop("nnz")), "lacks"),
    (lambda p: _edit_config(p, lambda c: c.update(format_version=99)), "newer"),
    (lambda p: (p / SPARSE_CONFIG).write_text("{not json"), "invalid JSON"),
    (lambda p: (p / SPARSE_CONFIG).unlink(), "not a sparse_runtime checkpoint"),
    (lambda p: (p / WEIGHTS).unlink(), "missing"),
])
def test_corrupt_checkpoints_give_clear_errors(saved, corrupt, match):
    _, path = saved
    corrupt(path)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(path)


def _shard_checkpoint(path, n=2):
    """Split a checkpoint's model.safetensors into ``n`` shards with an index, as large checkpoints come."""
    write_shards(path, load_file(path / WEIGHTS), n)
    (path / WEIGHTS).unlink()


def _truncate(p):
    (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:-1000])


@pytest.mark.parametrize("corrupt,match", [
    (_truncate, r"model.safetensors: tensor \S+: data ends at byte \d+ but the file holds \d+ \(truncated\)"),
    (lambda p: (p / WEIGHTS).write_bytes(b"garbled" * 10), r"model.safetensors: not a safetensors file"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{Q}.weight_meta": t[f"{Q}.weight_meta"].to(torch.int16)})),
     rf"model.safetensors: tensor {Q}.weight_meta: dtype int16, the model needs uint8"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{Q}.weight_values": t[f"{Q}.weight_values"].half()})),
     rf"model.safetensors: tensor {Q}.weight_values: dtype float16, the model needs float32"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{Q}.weight_values": torch.zeros(64, 30)})),
     rf"model.safetensors: tensor {Q}.weight_values: shape \[64, 30\], the model needs \[64, 32\]"),
    (lambda p: _edit_config(p, lambda c: c.update(format_version="1")), r"unknown format version '1'"),
    (lambda p: _edit_config(p, lambda c: c.update(format_version=0)), r"unknown format version 0"),
    (lambda p: _edit_config(p, lambda c: c.pop("format_version")), r"unknown format version None"),
    (lambda p: (_shard_checkpoint(p), (p / "model-00002-of-00002.safetensors").unlink()),
     r"index.json: shards it lists are missing: \['model-00002-of-00002.safetensors'\]"),
    (lambda p: (_shard_checkpoint(p), (p / INDEX).write_text("[]")), r"index.json: not a safetensors index"),
])
def test_corrupt_files_are_one_line_naming_file_and_tensor(saved, corrupt, match):
    _, path = saved
    corrupt(path)
    with pytest.raises(CheckpointError, match=match) as e:
        load_pretrained(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_sharded_checkpoint_loads_like_one_file(stories, saved):
    sparse, path = saved
    ids = torch.tensor([[1, 403, 407, 261, 378, 10]])
    _shard_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(sparse(ids).logits, load_pretrained(path, backend="reference")(ids).logits)


def test_cli_reports_a_truncated_checkpoint_in_one_line(saved, capsys):
    from sparse_runtime.cli import main

    _, path = saved
    _truncate(path)
    assert main(["generate", "--model", str(path), "--prompt", "x", "--max-new-tokens", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("sparse-runtime generate: error: ") and "truncated" in err, err


def test_save_rejects_nan(tmp_path):
    model = tiny_model("llama")
    sparsify(model)
    model.model.norm.weight.data[0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        save_pretrained(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "cusparselt", "torch", "decompressed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_checkpoint_on_gpu_matches_the_cpu_reference(stories, saved, backend, dtype):
    # stories260K's 172-wide MLP exercises every backend's padding / masking on a real model.
    model, tok = stories
    _, path = saved
    ids = tok("Once upon a time there was a", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = load_pretrained(path, backend="reference").double()(ids).logits
        gpu = load_pretrained(path, device="cuda", dtype=dtype, backend=backend)
        assert all(m.active_backend != "reference" for m in gpu.modules() if isinstance(m, SparseLinear))
        out = gpu(ids.cuda()).logits.double().cpu()
    err = (out - ref).norm() / ref.norm()
    assert err < (2e-2 if dtype == torch.bfloat16 else 4e-3), err
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


# -- quantized values -------------------------------------------------------------------------------------
QUANT = {"int8": QuantScheme.parse("int8"), "int4": QuantScheme.parse("int4", 32), "fp8": QuantScheme.parse("fp8")}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # torch.equal has no fp8 kernel


def _save_quantized(stories, path, scheme):
    model, tok = stories
    sparse = copy.deepcopy(model)
    sparsify(sparse, quant=QUANT[scheme])
    return sparse, save_pretrained(sparse, path, tokenizer=tok)


@pytest.mark.parametrize("scheme", sorted(QUANT))
def test_quantized_checkpoint_round_trip(stories, tmp_path, scheme):
    model, tok = stories
    sparse, path = _save_quantized(stories, tmp_path / "ckpt", scheme)
    quant = QUANT[scheme]
    entry = json.loads((path / SPARSE_CONFIG).read_text())["layers"][Q]
    assert entry["quant"] == {"scheme": scheme, "group_size": quant.group_size} and entry["sparsity"] == 0.5
    tensors = load_file(path / WEIGHTS)
    assert tensors[f"{Q}.weight_values"].dtype == quant.code_dtype
    assert tensors[f"{Q}.weight_scales"].shape == (64, quant.groups(64))
    loaded = load_pretrained(path)
    want = sparse.state_dict()
    for k, t in loaded.state_dict().items():  # every tensor bit-identical, codes in their own dtype
        assert t.dtype == want[k].dtype and torch.equal(_bits(t), _bits(want[k])), k
    dense = copy.deepcopy(model)  # the dense model computing with fake_quantize(W * mask)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, SparseLinear)}
    assert len(layers) == (30 if scheme == "int4" else 35)  # int4 g32 skips the 172-wide down_proj
    for name, layer in layers.items():
        assert layer.quant == quant
        lin = dense.get_submodule(name)
        lin.weight.data = fake_quantize(lin.weight.detach(), quant, mask=layer.sparse_weight.mask())
    ids = tok("Once upon a time there was a", return_tensors="pt").input_ids
    with torch.no_grad():
        out, mem, ref = loaded(ids).logits, sparse(ids).logits, dense(ids).logits
    assert torch.equal(out, mem)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    bf16 = load_pretrained(path, dtype=torch.bfloat16).get_submodule(Q)  # scales move, codes stay
    assert bf16.weight_scales.dtype == torch.bfloat16 and bf16.weight_values.dtype == quant.code_dtype
    assert torch.equal(_bits(bf16.weight_values), _bits(want[f"{Q}.weight_values"]))


@pytest.mark.parametrize("corrupt,match", [
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{Q}.weight_scales": t[f"{Q}.weight_scales"][:, :1].contiguous()})),
     rf"{Q}.weight_scales.*shape \[64, 1\], the model needs \[64, 2\]"),
    (lambda p: _edit_tensors(p, lambda t: t[f"{Q}.weight_scales"].__setitem__((3, 1), float("nan"))),
     f"{Q}.weight_scales.*NaN"),
    (lambda p: _edit_tensors(p, lambda t: t[f"{Q}.weight_scales"].__setitem__((3, 1), 0.0)),
     f"{Q}.scales: row 3, group 1 has scale 0.0; scales must be > 0"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{Q}.weight_values": t[f"{Q}.weight_values"].view(torch.int8)})),
     rf"{Q}.weight_values.*dtype int8, the model needs uint8"),
    (lambda p: _edit_tensors(p, lambda t: t.pop(f"{Q}.weight_scales")), f"missing.*{Q}.weight_scales"),
    (lambda p: _edit_config(p, lambda c: c["layers"][Q]["quant"].update(scheme="int8")),
     rf"{Q}.weight_values.*shape \[64, 16\], the model needs \[64, 32\]"),
    (lambda p: _edit_config(p, lambda c: c["layers"][Q]["quant"].update(group_size=64)),
     rf"{Q}.weight_scales.*shape \[64, 2\], the model needs \[64, 1\]"),
    (lambda p: _edit_config(p, lambda c: c["layers"][Q].pop("quant")), "unexpected"),
    (lambda p: _edit_config(p, lambda c: c["layers"][Q]["quant"].update(scheme="int3")),
     f"layer {Q} has a bad quant entry .*unknown quantization scheme 'int3'"),
    (lambda p: _edit_config(p, lambda c: c["layers"][Q].update(quant="int4")), "bad quant entry"),
])
def test_corrupt_quantized_checkpoints_give_clear_errors(stories, tmp_path, corrupt, match):
    _, path = _save_quantized(stories, tmp_path / "ckpt", "int4")
    corrupt(path)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(path)


# -- int8 embedding and lm_head (nn.int8_dense) ------------------------------------------------------------
E = "model.embed_tokens"


def _save_int8_head(stories, path):
    model, tok = stories
    sparse = copy.deepcopy(model)
    sparsify(sparse, quant=QUANT["int8"], head="int8")
    return sparse, save_pretrained(sparse, path, tokenizer=tok)


def test_int8_head_checkpoint_round_trip(stories, tmp_path):
    model, tok = stories
    sparse, path = _save_int8_head(stories, tmp_path / "ckpt")
    entries = json.loads((path / SPARSE_CONFIG).read_text())["dense_quantized"]
    int8 = {"scheme": "int8", "group_size": None}
    assert entries == {E: {"kind": "embedding", "num_embeddings": 512, "embedding_dim": 64, "padding_idx": None,
                           "dtype": "float32", "quant": int8},
                       "lm_head": {"kind": "linear", "in_features": 64, "out_features": 512, "bias": False,
                                   "tied_to": E, "dtype": "float32", "quant": int8}}
    tensors = load_file(path / WEIGHTS)
    assert tensors[f"{E}.weight_codes"].dtype == torch.int8 and tensors[f"{E}.weight_scales"].shape == (512, 1)
    assert not [k for k in tensors if k.startswith("lm_head.") or k == f"{E}.weight"]  # one int8 tensor, no dense
    loaded = load_pretrained(path)
    want = sparse.state_dict()
    assert sorted(loaded.state_dict()) == sorted(want)
    for k, t in loaded.state_dict().items():
        assert t.dtype == want[k].dtype and torch.equal(t, want[k]), k
    assert loaded.lm_head.tied is loaded.model.embed_tokens  # re-tied: the head reads the embedding's codes
    ids = tok("Once upon a time there was a", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, sparse(ids).logits)
    bf16 = load_pretrained(path, dtype=torch.bfloat16)  # scales move, codes stay
    assert bf16.lm_head.scales.dtype == torch.bfloat16 and bf16.lm_head.codes.dtype == torch.int8


def test_dense_int8_checkpoint_round_trip(stories, tmp_path):
    from sparse_runtime.nn.int8_dense import Int8Linear, quantize_dense

    model, tok = stories
    dense = copy.deepcopy(model)
    quantize_dense(dense)
    loaded = load_pretrained(save_pretrained(dense, tmp_path / "ckpt", tokenizer=tok))
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == 36
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, dense(ids).logits)


@pytest.mark.parametrize("corrupt,match", [
    (lambda p: _edit_tensors(p, lambda t: t[f"{E}.weight_scales"].__setitem__((7, 0), float("inf"))),
     f"{E}.weight_scales.*NaN/Inf"),
    (lambda p: _edit_tensors(p, lambda t: t[f"{E}.weight_scales"].__setitem__((7, 0), -1.0)),
     f"{E}.scales: row 7, group 0 has scale -1.0; scales must be > 0"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{E}.weight_scales": t[f"{E}.weight_scales"].half()})),
     f"{E}.weight_scales.*dtype float16, the model needs float32"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{E}.weight_scales": t[f"{E}.weight_scales"].view(-1)})),
     rf"{E}.weight_scales.*shape \[512\], the model needs \[512, 1\]"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{E}.weight_codes": t[f"{E}.weight_codes"].view(torch.uint8)})),
     f"{E}.weight_codes.*dtype uint8, the model needs int8"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{E}.weight_codes": t[f"{E}.weight_codes"][:, :32].contiguous()})),
     rf"{E}.weight_codes.*shape \[512, 32\], the model needs \[512, 64\]"),
    (lambda p: _edit_config(p, lambda c: c["dense_quantized"][E].update(embedding_dim=32)),
     r"lm_head: Int8Linear\(64->512\) cannot read an embedding of shape \[512, 32\]"),
    (lambda p: _edit_config(p, lambda c: (c["dense_quantized"][E].update(embedding_dim=32),
                                          c["dense_quantized"]["lm_head"].update(in_features=32))),
     f"{E}: checkpoint says 512x32, but the config builds 512x64"),
    (lambda p: _edit_config(p, lambda c: c["dense_quantized"]["lm_head"].update(tied_to="model.norm")),
     "lm_head is tied to 'model.norm', which is no int8 embedding"),
    (lambda p: _edit_config(p, lambda c: c["dense_quantized"][E].update(kind="conv")), "has kind 'conv'"),
    (lambda p: _edit_config(p, lambda c: c["dense_quantized"][E]["quant"].update(scheme="int4")),
     "dense modules take int8, one scale per row"),
    (lambda p: _edit_config(p, lambda c: c["dense_quantized"][E].pop("dtype")), rf"{E} lacks \['dtype'\]"),
    (lambda p: _edit_config(p, lambda c: c["dense_quantized"].pop(E)), "lm_head is tied to"),
])
def test_corrupt_int8_head_checkpoints_give_clear_errors(stories, tmp_path, corrupt, match):
    _, path = _save_int8_head(stories, tmp_path / "ckpt")
    corrupt(path)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(path)
