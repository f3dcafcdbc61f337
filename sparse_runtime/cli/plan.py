"""``sparse-runtime plan``: choose which linears run 2:4 and which stay dense for a target, and write the plan."""
from __future__ import annotations

import json
import sys

HELP = "deployment plan: which linears run 2:4 vs dense for a target decode speedup or share of 2:4 weights"


def add_arguments(p) -> None:
    from .common import add_model_arguments
    from .prune import add_calibration_arguments

    add_model_arguments(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-speedup", type=float, default=None,
                        help="predicted decode speedup over dense (byte model: a 2:4 linear moves 9/16 of the bytes)")
    target.add_argument("--target-fraction", type=float, default=None,
                        help="fraction of the decoder's linear weights that must run 2:4")
    p.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt"],
                   help="the 2:4 pruning whose per-linear reconstruction errors rank the linears (default: wanda)")
    add_calibration_arguments(p)
    p.set_defaults(nsamples=32, seqlen=512)
    p.add_argument("--depth-weight", type=float, default=None,
                   help="how much more an early block's error counts: exp(w (L-1-i)/(L-1)) for block i (default: "
                        "searched: the weight whose plan, pruned 2:4, scores lowest on --val-windows held-out windows)")
    p.add_argument("--val-windows", type=int, default=16,
                   help="held-out windows of --seqlen from the calibration file's unused documents (default: 16)")
    p.add_argument("--out", default=None, help="write the plan JSON here (atomically), for `prune --plan`")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")


def run(args) -> int:
    import torch

    from ..models.sources import load_model
    from ..prune import DEFAULT_CALIB, prune
    from ..data.calibration import validation_windows
    from ..prune.plan import choose, linear_costs, search_depth_weight
    from .common import DTYPES
    from .prune import calibration_from_args

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    model, tok = load_model(args.model, device="cpu", dtype=dtype)
    used: set[int] = set()
    calib = calibration_from_args(args, tok, model, used)
    dense = {k: v.clone() for k, v in model.state_dict().items()} if args.depth_weight is None else None
    # errors are measured on a whole-model 2:4 prune; the pruned model itself is discarded
    result = prune(model, args.method, "2:4", calib=calib, device=device, record_errors=True, progress=True)
    costs, other = linear_costs(model, result.errors)
    target = {"fraction": args.target_fraction, "speedup": args.target_speedup, "other": other}
    plan = choose(costs, depth_weight=args.depth_weight or 0.0, **target)  # refuses a bad target before the search
    if args.depth_weight is None:
        model.load_state_dict(dense)
        val = validation_windows(tok, args.calib or DEFAULT_CALIB, args.val_windows, calib.shape[1], exclude=used,
                                 bos=args.bos)
        plan = search_depth_weight(model, costs, calib, val, method=args.method, device=device,
                                   log=lambda m: print(m, file=sys.stderr), **target)
    plan.info.update({"model": str(args.model), "method": args.method, "errors": {c.name: round(c.error, 6) for c in costs},
                      "calibration": {"file": str(args.calib or DEFAULT_CALIB), "nsamples": calib.shape[0],
                                      "seqlen": calib.shape[1], "seed": args.seed}})
    if args.out:
        plan.save(args.out)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.table(costs))
        if args.out:
            print(f"wrote {args.out}")
    return 0
