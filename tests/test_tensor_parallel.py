"""Tensor parallelism: 2 gloo processes on the CPU give the single-process model's logits and greedy tokens."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_runtime import SparseLinear, load_pretrained, save_pretrained, sparsify
from sparse_runtime.cli import main
from sparse_runtime.format.quant import QuantScheme
from sparse_runtime.serving.generate import stream_generate
from sparse_runtime.serving.tensor_parallel import (ROW, TensorParallelError, load_tensor_parallel, shard_plan,
                                            sparse_bytes, start)

from conftest import TEXT
from helpers import tiny_model

PROMPT = "Once upon a time"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, ckpt, ids, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rank, device = start(world, "cpu")
    model = load_tensor_parallel(ckpt, rank, world, device=device)
    tok = AutoTokenizer.from_pretrained(ckpt)
    with torch.no_grad():
        logits = model(ids).logits
    tokens = [t.id for t in stream_generate(model, tok, PROMPT, 12)]
    torch.save({"logits": logits, "tokens": tokens, "sparse_bytes": sparse_bytes(model)}, f"{out}/rank{rank}.pt")


def run_tensor_parallel(ckpt, ids, tmp_path, world=2):
    mp.spawn(_rank, args=(world, _free_port(), str(ckpt), ids, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def check_matches_single_process(ckpt, ids, tmp_path):
    single = load_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    with torch.no_grad():
        want = single(ids).logits
    want_tokens = [t.id for t in stream_generate(single, tok, PROMPT, 12)]
    ranks = run_tensor_parallel(ckpt, ids, tmp_path)
    scale = want.abs().max().item()
    for r in ranks:
        # fp32: the row-parallel sum of partial products rounds differently from one GEMM over all of K
        err = (r["logits"] - want).abs().max().item()
        print(f"{ckpt.name}: max |logit difference| {err:.2e}, max |logit| {scale:.2f}")
        assert err <= 1e-5 * scale
        assert r["tokens"] == want_tokens
    # each rank holds exactly its shard of every sparse layer, and together they hold the whole
    plans = shard_plan(single.config, 2)
    assert [r["sparse_bytes"] for r in ranks] == [shard_bytes(single, p) for p in plans]
    assert sum(r["sparse_bytes"] for r in ranks) == sparse_bytes(single)
    return [r["sparse_bytes"] / sparse_bytes(single) for r in ranks]


def shard_bytes(model, plan) -> int:
    """Bytes of the 2:4 values and metadata one rank's shard of ``model``'s sparse layers should hold."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            leaf = name.rpartition(".")[2]
            a, b = plan[leaf]
            rows, cols = (m.out_features, b - a) if leaf in ROW else (b - a, m.in_features)
            total += rows * cols // 2 * m.weight_values.element_size() + rows * -(-cols // 8)
    return total


@pytest.fixture(scope="module")
def stories_ckpt(stories_dir, tmp_path_factory, one_thread):
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    assert len(sparsify(model).replaced) == 35
    return save_pretrained(model, tmp_path_factory.mktemp("tp") / "stories24",
                           tokenizer=AutoTokenizer.from_pretrained(stories_dir))


def test_stories260k_two_ranks_match_one(stories_ckpt, tmp_path):
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    shares = check_matches_single_process(stories_ckpt, ids, tmp_path)
    assert max(shares) < 0.51  # 88/84 in the MLP, even in attention


@pytest.mark.slow
def test_smollm2_two_ranks_match_one(tmp_path, one_thread):
    from sparse_runtime.models.sources import load_model, named_gguf

    try:
        named_gguf("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    assert len(sparsify(model).replaced) == 210
    ckpt = save_pretrained(model, tmp_path / "smol24", tokenizer=tok)
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    shares = check_matches_single_process(ckpt, ids, tmp_path)
    assert max(shares) < 0.55  # 2 of its 3 KV groups on rank 0, the MLP even


def test_shards_cut_whole_kv_groups_and_8_column_blocks(stories_dir):
    cfg = transformers.AutoConfig.from_pretrained(stories_dir)  # 8 heads, 4 KV heads, head_dim 8, 172 intermediate
    first, second = shard_plan(cfg, 2)
    assert first["q_proj"] == first["o_proj"] == (0, 32) and second["q_proj"] == (32, 64)
    assert first["k_proj"] == first["v_proj"] == (0, 16)
    assert first["down_proj"] == first["gate_proj"] == (0, 88) and second["down_proj"] == (88, 172)
    smol = transformers.LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                    intermediate_size=1536)  # SmolLM2-135M: 3 KV groups over 2 ranks are 2 + 1
    assert [p["q_proj"] for p in shard_plan(smol, 2)] == [(0, 384), (384, 576)]
    assert [p["k_proj"] for p in shard_plan(smol, 2)] == [(0, 128), (128, 192)]


def test_bad_world_sizes_are_refused(stories_dir):
    cfg = transformers.AutoConfig.from_pretrained(stories_dir)
    with pytest.raises(TensorParallelError, match="num_key_value_heads=4 .* over 5 ranks"):
        shard_plan(cfg, 5)
    small = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                     intermediate_size=8)
    with pytest.raises(TensorParallelError, match="intermediate_size=8 in blocks of 8 columns over 2 ranks"):
        shard_plan(small, 2)
    with pytest.raises(TensorParallelError, match=">= 1"):
        shard_plan(cfg, 0)


def test_a_boundary_inside_a_metadata_byte_is_refused(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, head_dim=4,
                                   intermediate_size=32, num_hidden_layers=1, vocab_size=32)
    cfg.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(cfg).eval()
    sparsify(model)
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(TensorParallelError, match=r"o_proj.weight_(meta|values): a shard boundary at input column 4 "):
        load_tensor_parallel(ckpt, rank=1, world=4)  # one head of 4 columns per rank


def test_other_inputs_are_refused(tmp_path, stories_dir, monkeypatch):
    with pytest.raises(TensorParallelError, match="no sparse_config.json"):
        load_tensor_parallel(stories_dir, rank=0, world=2)
    quantized = tiny_model("llama")
    sparsify(quantized, quant=QuantScheme.parse("int8"))
    with pytest.raises(TensorParallelError, match=r"q_proj: layers with quantized values \(int8\) cannot be sharded"):
        load_tensor_parallel(save_pretrained(quantized, tmp_path / "q"), rank=0, world=2)
    bert = tiny_model("bert")
    sparsify(bert)
    with pytest.raises(TensorParallelError, match="Llama-style decoders"):
        load_tensor_parallel(save_pretrained(bert, tmp_path / "bert"), rank=0, world=2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(TensorParallelError, match="torchrun --nproc_per_node 2 .*WORLD_SIZE=1"):
        start(2, "cpu")


def test_cli_refuses_tp_without_torchrun(stories_ckpt, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for cmd in ("generate", "serve"):
        assert main([cmd, "--model", str(stories_ckpt), "--tp", "2", "--device", "cpu"]) == 2
        assert "needs 2 processes" in capsys.readouterr().err


def _torchrun(*args) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "sparse_runtime", *args, "--tp", "2", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_torchrun_generate_and_eval_match_one_process(stories_ckpt, capsys):
    gen = ["generate", "--model", str(stories_ckpt), "--prompt", PROMPT, "--max-new-tokens", "16", "--no-chat",
           "--json"]
    ev = ["eval", "--model", str(stories_ckpt), "--data", str(TEXT / "tinystories_valid_head.txt"), "--seqlen", "64",
          "--max-tokens", "640", "--json"]
    results = {}
    for name, args in (("generate", gen), ("eval", ev)):
        assert main(args + ["--device", "cpu"]) == 0
        single = json.loads(capsys.readouterr().out)
        lines = _torchrun(*args).splitlines()
        assert len(lines) == 1, lines  # rank 0 prints, rank 1 is silent
        results[name] = single, json.loads(lines[0])
    (one, two), (ppl_one, ppl_two) = results["generate"], results["eval"]
    assert two["text"] == one["text"] and two["tokens"] == one["tokens"] == 16
    assert ppl_two["ppl"] == pytest.approx(ppl_one["ppl"], rel=1e-5) and ppl_two["tokens"] == ppl_one["tokens"]


def test_torchrun_serve_answers_as_one_process(stories_ckpt):
    """serve --tp 2 over real HTTP: rank 0 serves, rank 1 replays its model calls; concurrent greedy requests
    get the single-process engine's text; SIGTERM stops both ranks."""
    import re

    import httpx

    from sparse_runtime.serving.engine import Engine, Request, SamplingParams

    prompts = [PROMPT, "The little dog"]
    single, tok = load_pretrained(stories_ckpt), AutoTokenizer.from_pretrained(stories_ckpt)
    want = [r.text for r in Engine(single, tok, max_batch=4, max_seq_len=128).generate(
        [Request(tok(p).input_ids, SamplingParams(max_tokens=12)) for p in prompts])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "sparse_runtime", "serve", "--model", str(stories_ckpt),
           "--tp", "2", "--device", "cpu", "--port", "0", "--max-batch", "4", "--max-seq-len", "128"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = None
        for line in proc.stderr:
            if m := re.search(r"serving .* on (http://\S+)", line):
                url = m.group(1)
                break
        assert url, "the server never printed its address"
        import threading
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        body = lambda p: {"prompt": p, "max_tokens": 12, "temperature": 0}
        with httpx.Client(timeout=120) as client:
            import concurrent.futures as cf
            with cf.ThreadPoolExecutor(2) as pool:
                got = list(pool.map(lambda p: client.post(url + "/v1/completions", json=body(p)), prompts))
        assert [r.status_code for r in got] == [200, 200]
        assert [r.json()["choices"][0]["text"] for r in got] == want
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)  # both ranks stop (rank 1 waits for rank 0's stop); torchrun itself exits 1 on a signal
