"""``sparse-runtime recover``: fine-tune a pruned checkpoint's kept weights toward its dense model, masks frozen."""
from __future__ import annotations

import argparse
import json
import sys

HELP = ("recover what pruning cost: fine-tune a sparse checkpoint's kept weights (masks frozen) by distillation "
        "from the dense model, and write a sparse checkpoint")


def add_arguments(p) -> None:
    from ..recover.config import LOSSES, RecoverConfig

    d = RecoverConfig()
    p.add_argument("--model", required=True, help="sparse checkpoint to recover (any pattern; rotated ones too)")
    p.add_argument("--teacher", default=None,
                   help="the dense model it was pruned from, or any with the same tokenizer: folder, .gguf file or "
                        "known name (not needed for --loss ce)")
    p.add_argument("--data", default=None,
                   help="training text or jsonl (default: the shared C4 sample); the documents the checkpoint's "
                        "calibration used and the held-out ones are left out; an evaluation text is refused")
    p.add_argument("--tokens", type=int, required=True,
                   help="training tokens (block: summed over the decoder layers)")
    p.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="kd: logit KL; squarehead: per-layer normalized MSE on decoder outputs plus KL; ce: "
                        "next-token cross-entropy; block: each decoder layer in turn reproduces the dense layer's "
                        f"outputs, one layer on the device (default: {d.loss})")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help=f"window length (default: {d.seqlen})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"windows per step (default: {d.batch})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW peak learning rate (default: {d.lr:g})")
    p.add_argument("--warmup", type=float, default=d.warmup,
                   help=f"linear warm-up, a fraction of the steps, then cosine decay (default: {d.warmup:g})")
    p.add_argument("--min-lr", type=float, default=d.min_lr,
                   help=f"where the cosine ends, a fraction of --lr (default: {d.min_lr:g})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip, help=f"gradient norm clip (default: {d.clip:g})")
    p.add_argument("--temperature", type=float, default=d.temperature, help="distillation temperature")
    p.add_argument("--eval-every", type=int, default=0, metavar="TOKENS",
                   help="held-out perplexity every this many training tokens (default: before and after only)")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows,
                   help=f"held-out windows of --seqlen, from documents not trained on (default: {d.eval_windows})")
    p.add_argument("--block-windows", type=int, default=d.block_windows,
                   help=f"block: windows each layer is reconstructed on (default: {d.block_windows})")
    p.add_argument("--seed", type=int, default=d.seed, help="window order seed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=d.checkpointing,
                   help="activation checkpointing of the decoder layers (default: on)")
    p.add_argument("--code-lr", type=float, default=d.code_lr,
                   help="a quantized checkpoint's codes: peak learning rate in grid steps (they train on the grid; "
                        f"default: {d.code_lr:g})")
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train the input embedding and the output head (default: only the decoder layers' "
                        "kept weights, norms and biases)")
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where the device multiplies bf16 natively)")
    p.add_argument("--state", default=None,
                   help="folder of the resumable state (default: OUT.state), written when the run stops early, "
                        "is interrupted, or every --save-every steps")
    p.add_argument("--save-every", type=int, default=0, metavar="STEPS", help="save the state every STEPS steps")
    p.add_argument("--resume", action="store_true", help="continue from the saved state, if there is one")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                   help="end this session after STEPS steps in all, state saved (--resume continues)")
    p.add_argument("--keep-best", action="store_true",
                   help="end with the weights of the evaluation (--eval-every) of lowest held-out perplexity, not "
                        "the last step's (not with --resume, --stop-after or --save-every)")
    p.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")


def run(args) -> int:
    from ..data.calibration import DEFAULT_CALIB
    from ..recover import RecoverConfig, recover

    config = RecoverConfig(
        loss=args.loss, tokens=args.tokens, seqlen=args.seqlen, batch=args.batch, lr=args.lr, code_lr=args.code_lr,
        warmup=args.warmup, min_lr=args.min_lr, weight_decay=args.weight_decay, clip=args.clip,
        temperature=args.temperature, eval_every=args.eval_every, eval_windows=args.eval_windows,
        block_windows=args.block_windows, seed=args.seed, device=args.device, checkpointing=args.checkpointing,
        autocast=args.autocast, embeddings=args.train_embeddings,
        state=args.state or f"{str(args.out).rstrip('/')}.state", save_every=args.save_every, resume=args.resume,
        stop_after=args.stop_after, keep_best=args.keep_best)
    result = recover(args.model, args.teacher, args.data or DEFAULT_CALIB, args.out, config)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    evals = result.evals
    if evals:
        print(f"held-out perplexity {evals[0]['ppl']:.2f} -> {evals[-1]['ppl']:.2f} "
              f"({len(evals)} evaluations)", file=sys.stderr)
    if result.kept:
        print(f"kept the weights of step {result.kept['step']} (held-out perplexity {result.kept['ppl']:.2f})",
              file=sys.stderr)
    print(f"{result.steps}/{result.total_steps} steps, {result.tokens:,} tokens in {result.seconds:.1f} s "
          f"({result.tokens_per_s:,.0f} tokens/s)", file=sys.stderr)
    print(f"wrote {result.out}" if result.out else f"stopped early; state in {config.state} (--resume continues)")
    return 0
