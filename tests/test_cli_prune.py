"""``sparse-runtime prune`` and ``eval`` end to end on stories260K, and their bad-input errors."""
import json

import pytest
import torch

from sparse_runtime import SparseLinear, load_pretrained
from sparse_runtime.models.checkpoint import read_sparse_config
from sparse_runtime.cli import main
from sparse_runtime.format.masks import validate_nm
from sparse_runtime.nn.int8_dense import Int8Embedding
from sparse_runtime.models.sources import load_model
from sparse_runtime.prune import calibration_windows, prune

from conftest import TEXT

STORIES_TEXT = str(TEXT / "tinystories_valid_head.txt")


def _prune(stories_dir, out, *extra):
    return main(["prune", "--model", str(stories_dir), "--device", "cpu", "--calib", STORIES_TEXT,
                 "--nsamples", "4", "--seqlen", "64", "--out", str(out), *extra])


@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", "4:8"),
                                            ("magnitude", "unstructured")])
def test_prune_writes_a_checkpoint_load_pretrained_and_eval_take(stories_dir, tmp_path, capsys, method, pattern):
    out = tmp_path / "ckpt"
    assert _prune(stories_dir, out, "--method", method, "--pattern", pattern, "--json", "--errors") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == method and info["pattern"] == pattern and info["out"] == str(out)
    assert info["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert len(info["skipped"]) == (5 if pattern == "4:8" else 0)  # the 172-wide down_proj cannot take 4:8
    assert method == "magnitude" or all(0 < e < 1 for e in info["reconstruction_error"].values())
    model = load_pretrained(out)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == info["pruned_layers"] and all(m.pattern == pattern for m in sparse)
    if pattern != "unstructured":
        for m in sparse:
            validate_nm(m.dense_weight() != 0, *map(int, pattern.split(":")))
    assert read_sparse_config(out)["pruning"]["method"] == method
    assert main(["eval", "--model", str(out), "--data", STORIES_TEXT, "--seqlen", "128", "--max-tokens", "1024",
                 "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["seqlen"] == 128 and ev["tokens"] == 8 * 127 and 1 < ev["ppl"] < 500


def test_eval_prints_seqlen_beside_the_number(stories_dir, capsys):
    assert main(["eval", "--model", str(stories_dir), "--data", STORIES_TEXT, "--seqlen", "4096",
                 "--max-tokens", "1024"]) == 0
    assert "perplexity" in (line := capsys.readouterr().out) and "seqlen 512" in line  # clipped to the context


@pytest.mark.parametrize("extra,message", [
    (["--method", "wanda", "--seqlen", "100000", "--nsamples", "1", "--calib", "SHORT"],
     "fewer than one calibration window"),
    (["--method", "sparsegpt", "--pattern", "unstructured", "--sparsity", "1.5"], "sparsity must be in (0, 1)"),
    (["--method", "wanda", "--sparsity", "0"], "sparsity must be in (0, 1)"),
    (["--method", "sparsegpt", "--pattern", "4:8", "--targets", "down_proj"],
     "down_proj: in_features=172 is not divisible by 8"),
    (["--method", "magnitude", "--pattern", "3:2"], "needs 0 < N < M"),
    (["--method", "wanda", "--calib", "MISSING"], "not found"),
    (["--method", "wanda", "--rotate", "nm", "--rotate-blocks", "3"], "do not divide the hidden size 64"),
    (["--method", "wanda", "--rotate", "nm", "--rotate-steps", "-1"], "steps >= 0"),
])
def test_bad_input_is_a_clear_error_and_leaves_no_checkpoint(stories_dir, tmp_path, capsys, extra, message):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    extra = [str(short) if a == "SHORT" else str(tmp_path / "missing.txt") if a == "MISSING" else a for a in extra]
    out = tmp_path / "ckpt"
    argv = ["prune", "--model", str(stories_dir), "--device", "cpu", "--calib", STORIES_TEXT, "--nsamples", "2",
            "--seqlen", "32", "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sparse-runtime prune: error:" in err and message in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]


def test_quantize_head_writes_one_int8_tensor_for_the_tied_pair(stories_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert _prune(stories_dir, out, "--method", "magnitude", "--quantize", "int8", "--quantize-head", "int8",
                  "--json") == 0
    info = json.loads(capsys.readouterr().out)
    head = {h["name"]: h for h in info["compression"]["head"]}
    assert head["lm_head"]["tied_to"] == "model.embed_tokens" and head["model.embed_tokens"]["int8_bytes"] > 0
    model = load_pretrained(out)
    assert isinstance(model.model.embed_tokens, Int8Embedding) and model.lm_head.tied is model.model.embed_tokens
    assert set(read_sparse_config(out)["dense_quantized"]) == {"model.embed_tokens", "lm_head"}
    with pytest.raises(SystemExit):
        _prune(stories_dir, tmp_path / "bad", "--method", "magnitude", "--quantize-head", "int4")
    assert "argument --quantize-head: invalid choice: 'int4'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_sparsegpt_checkpoint_matches_pruning_in_python(stories_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert _prune(stories_dir, out, "--method", "sparsegpt", "--pattern", "2:4") == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model, tok = load_model(stories_dir)
    prune(model, "sparsegpt", "2:4", calib=calibration_windows(tok, STORIES_TEXT, 4, 64, seed=0), progress=False)
    ids = torch.arange(40).view(1, 40)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(out)(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per", ["row", "matrix"])
def test_magnitude_unstructured_threshold_scope(stories_dir, tmp_path, capsys, per):
    out = tmp_path / "ckpt"
    assert _prune(stories_dir, out, "--method", "magnitude", "--pattern", "unstructured", "--per", per) == 0
    assert read_sparse_config(out)["pruning"]["options"] == {"per": per}
    row_sparsity = torch.cat([(m.dense_weight() == 0).float().mean(1) for m in load_pretrained(out).modules()
                              if isinstance(m, SparseLinear)])
    assert row_sparsity.mean().item() == pytest.approx(0.5, abs=0.01)
    if per == "row":  # every row drops exactly half (in_features 64 and 172 are even)
        assert torch.all(row_sparsity == 0.5)
    else:  # one threshold per matrix: rows differ
        assert row_sparsity.std().item() > 0.01


def test_rotated_prune_checkpoint_reloads_with_the_same_logits(stories_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert _prune(stories_dir, out, "--method", "sparsegpt", "--rotate", "nm", "--rotate-steps", "5",
                  "--rotate-blocks", "2", "--refit", "3", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rotation"]["objective"] == "nm" and len(info["rotation"]["layers"]) == 5
    assert all(r["best"] <= r["initial"] for r in info["rotation"]["layers"])
    sc = read_sparse_config(out)
    assert sc["pruning"]["rotation"] == {"objective": "nm", "steps": 5, "blocks": 2}
    assert sc["pruning"]["options"] == {"blocksize": 128, "damp": 0.01, "refit": 3}
    assert sc["residual_rotation"] == {str(i): [2, 32, 32] for i in range(1, 5)}
    model, tok = load_model(stories_dir)
    prune(model, "sparsegpt", "2:4", calib=calibration_windows(tok, STORIES_TEXT, 4, 64, seed=0), progress=False,
          rotate="nm", rotate_steps=5, rotate_blocks=2, refit=3)
    ids = torch.arange(40).view(1, 40)
    loaded = load_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        # decoding with the KV cache (one token per step through the boundary rotations) = greedy without it
        prompt = tok("Once upon a time", return_tensors="pt").input_ids
        cached = loaded.generate(prompt, max_new_tokens=12, do_sample=False)
        seq = prompt
        for _ in range(12):
            seq = torch.cat([seq, loaded(seq).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(cached, seq)
    assert main(["generate", "--model", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "8",
                 "--no-chat"]) == 0
    assert tok.decode(cached[0, prompt.shape[1]:prompt.shape[1] + 8]).strip()[:6] in capsys.readouterr().out


def test_allocation_rates_go_to_sparse_config_table_and_plot(stories_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert _prune(stories_dir, out, "--method", "wanda", "--pattern", "unstructured", "--sparsity", "0.6",
                  "--allocation", "atp", "--beta", "0.05") == 0
    err = capsys.readouterr().err
    assert "atp, beta 0.0500: parameter-weighted mean 0.6000 (target 0.6)" in err
    alloc = read_sparse_config(out)["pruning"]["allocation"]
    assert alloc["strategy"] == "atp" and alloc["rates"] == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7])
    assert (tmp_path / "ckpt_allocation.png").read_bytes()[:4] == b"\x89PNG"
    model = load_pretrained(out)
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            assert m.sparsity == pytest.approx(alloc["rates"][int(name.split(".")[2])], abs=0.02)


def test_mixed_nm_allocation_checkpoint_reloads_with_the_same_logits(stories_dir, tmp_path, capsys):
    out, png = tmp_path / "ckpt", tmp_path / "rates.png"
    assert _prune(stories_dir, out, "--method", "wanda", "--pattern", "2:4", "--allocation", "owl",
                  "--owl-lambda", "0.2", "--plot", str(png), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    patterns = info["allocation"]["block_patterns"]
    assert len(set(patterns)) > 1 and info["allocation_plot"] == str(png) and png.exists()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    model = load_pretrained(out)
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            assert m.pattern == patterns[int(name.split(".")[2])]
            validate_nm(m.dense_weight() != 0, *map(int, m.pattern.split(":")))
    ref, tok = load_model(stories_dir)
    from sparse_runtime.prune.allocation import allocate

    calib = calibration_windows(tok, STORIES_TEXT, 4, 64, 0)
    prune(ref, "wanda", "2:4", calib=calib, progress=False,
          allocation=allocate(ref, "owl", 0.5, pattern="2:4", calib=calib, lam=0.2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_beta_search_from_the_cli(stories_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["prune", "--model", str(stories_dir), "--device", "cpu", "--nsamples", "4", "--seqlen", "64",
                 "--method", "wanda", "--pattern", "unstructured", "--sparsity", "0.7", "--allocation", "atp",
                 "--beta-search", "--beta-step", "0.05", "--val-windows", "2", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    search = info["allocation"]["search"]
    assert [t["beta"] for t in search["trials"]] == pytest.approx([0.05, 0.1])
    assert info["allocation"]["beta"] in (0.05, 0.1) and search["validation_windows"] == [2, 64]
    assert read_sparse_config(out)["pruning"]["allocation"]["search"]["trials"] == search["trials"]


@pytest.mark.parametrize("extra,message", [
    (["--allocation", "atp"], "--allocation atp needs --beta B or --beta-search"),
    (["--beta", "0.01"], "--beta and --beta-search belong to --allocation atp"),
    (["--allocation", "atp", "--beta", "0.5", "--sparsity", "0.7", "--pattern", "unstructured"],
     "illegal ATP beta 0.5: need 0 < beta <= min(2S/(L-1), 2(1-S)/(L-1)) = 0.150000 for S=0.7, L=5"),
    (["--allocation", "atp", "--beta-search", "--rotate", "nm"], "--beta-search with --rotate is not supported"),
    (["--refit", "5"], "--refit re-solves SparseGPT's kept weights: it takes --method sparsegpt"),
    (["--refit", "-1"], "--refit takes a number of steps >= 0, not -1"),
    (["--allocation", "owl", "--owl-lambda", "0.6", "--pattern", "unstructured", "--sparsity", "0.7"],
     "outside [0, 1)"),
])
def test_bad_allocation_flags_are_one_line_errors(stories_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "ckpt"
    assert _prune(stories_dir, out, "--method", "wanda", *extra) == 2
    err = capsys.readouterr().err
    assert "sparse-runtime prune: error:" in err and message in err, err
    assert not out.exists()
