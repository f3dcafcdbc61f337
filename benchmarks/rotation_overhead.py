"""What the residual rotation costs at run time on a GPU: one Llama-3-8B-shaped decoder layer (random weights, every
linear 2:4 on the `auto` backend), timed with and without its boundary rotation (full d x d and k blocks), at decode
(M = 1..16 tokens) and prefill (M = 2048). Device time per layer call: median of CUDA-event timings of CUDA-graph
replays (sparse_runtime.ops.timing.device_time_us, L2 flushed). Writes benchmarks/results/rotation_overhead-<date>.json.

    python -m benchmarks.rotation_overhead [--ms 1 2 4 8 16 2048] [--blocks 1 4] [--out FILE]

The paper (A100, M = 2048, PyTorch semi-structured): +7.3% layer time; this project's target is at most half.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .common import RESULTS, metadata, write_json



def build_layer(dtype, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from sparse_runtime import sparsify

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).to(device, dtype).eval()
    sparsify(layer, pattern="2:4", backend="auto", progress=False)
    return layer, LlamaRotaryEmbedding(cfg).to(device)


def main(argv=None) -> int:
    from sparse_runtime.models.residual_rotation import set_boundary
    from sparse_runtime.ops.timing import device_time_us

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 2048])
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("rotation_overhead.py needs a CUDA GPU (it reports device time)")
    dtype, device = getattr(torch, args.dtype), torch.device("cuda")
    torch.manual_seed(0)
    layer, rope = build_layer(dtype, device)
    d = 4096
    rows = []
    for m in args.ms:
        x = torch.randn(1, m, d, device=device, dtype=dtype)
        pos = torch.arange(m, device=device).unsqueeze(0)
        emb = rope(x, pos)

        def call():
            return layer(x, position_embeddings=emb, position_ids=pos)

        set_boundary(layer, None)
        base = device_time_us(call)
        row = {"M": m, "layer_us": round(base, 2)}
        for k in args.blocks:
            q = torch.linalg.qr(torch.randn(k, d // k, d // k, device=device, dtype=torch.float32))[0]
            set_boundary(layer, q[0] if k == 1 else q)
            t = device_time_us(call)
            row[f"rotated_b{k}_us"] = round(t, 2)
            row[f"overhead_b{k}_pct"] = round(100 * (t / base - 1), 2)
        set_boundary(layer, None)
        rows.append(row)
        print(row, flush=True)
    report = {**metadata("cuda"), "dtype": args.dtype, "shape": "Llama-3-8B layer (d 4096, 32/8 heads, "
              "MLP 14336), every linear 2:4 on backend auto", "timer": "device_time_us: CUDA graphs, L2 flushed, "
              "median", "rows": rows}
    out = write_json(Path(args.out) if args.out else
                     RESULTS / f"rotation_overhead-{report['date'][:10].replace('-', '')}.json", report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
