"""``sparse-runtime prune``: prune a model layer by layer and write a compressed sparse checkpoint."""
from __future__ import annotations

import argparse
import json
import sys

HELP = "prune a model (magnitude, Wanda, SparseGPT) to 2:4 / N:M / unstructured and save a sparse checkpoint"


def add_arguments(p) -> None:
    from ..prune import METHODS, ROTATE_OBJECTIVES
    from ..prune.calibration import SAMPLINGS
    from .common import add_bos_argument, add_model_arguments

    add_model_arguments(p)
    p.add_argument("--method", default="sparsegpt", choices=list(METHODS))
    p.add_argument("--pattern", default="2:4", help="N:M (2:4, 4:8, ...) or 'unstructured' (default: 2:4)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned for unstructured (default: 0.5)")
    p.add_argument("--calib", default=None, help="calibration text or jsonl file (default: shared C4 validation)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: 128)")
    p.add_argument("--seqlen", type=int, default=2048,
                   help="calibration window length, clipped to the model's context (default: 2048)")
    p.add_argument("--per", choices=["row", "matrix"], default="matrix",
                   help="magnitude, unstructured: threshold per output row or per weight matrix (default: matrix)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--calib-sampling", choices=SAMPLINGS, default="reference",
                   help="'reference': per window a random document longer than it and a random slice, as the "
                        "reference Wanda/SparseGPT C4 loader draws; 'concat': shuffled documents joined and cut")
    add_bos_argument(p, "calibration windows")
    p.add_argument("--targets", nargs="+", default=None,
                   help="linears to prune (globs or trailing names); default: every linear in the decoder layers")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block (default: 128)")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT damping, fraction of mean diag(H)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate each group of a layer's linears on the outputs of the groups pruned before it "
                        "(default: on for SparseGPT, off for Wanda, as in their papers)")
    p.add_argument("--rotate", choices=["none", *ROTATE_OBJECTIVES], default="none",
                   help="learn DenoiseRotator rotations per decoder layer before pruning it: the paper's entropy, "
                        "or nm, the fraction of importance the pattern's mask drops (default: none)")
    p.add_argument("--rotate-steps", type=int, default=100, help="Adam steps per decoder layer (default: 100)")
    p.add_argument("--rotate-blocks", type=int, default=1,
                   help="diagonal blocks of the residual rotation R1 (default: 1, a full d x d rotation)")
    p.add_argument("--offload", action="store_true", help="keep calibration activations on the CPU")
    p.add_argument("--errors", action="store_true", help="report ||WX - W_hat X|| / ||WX|| per linear")
    p.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")


def run(args) -> int:
    from ..checkpoint import save_pretrained
    from ..models import load_model
    from ..prune import DEFAULT_CALIB, calibration_windows, prune
    from ..prune.calibration import bos_mode, context_length
    from ..prune.layerwise import check_sparsity
    from ..sparsify import sparsify
    from .common import device_dtype

    check_sparsity(args.pattern, args.sparsity)  # fail before the slow model load
    rotate = None
    if args.rotate != "none":
        from ..prune import RotateOptions

        rotate = RotateOptions(args.rotate, args.rotate_steps, args.rotate_blocks, damp=args.damp)
    device, dtype = device_dtype(args)
    model, tok = load_model(args.model, device="cpu", dtype=dtype)  # layers visit `device` one at a time
    calib = None
    if args.method != "magnitude":
        calib = calibration_windows(tok, args.calib or DEFAULT_CALIB, args.nsamples, args.seqlen, args.seed,
                                    max_seqlen=context_length(model), sampling=args.calib_sampling, bos=args.bos)
    options = ({"blocksize": args.blocksize, "damp": args.damp} if args.method == "sparsegpt" else
               {"per": args.per} if args.method == "magnitude" else {})
    if args.true_sequential is not None:
        options["true_sequential"] = args.true_sequential
    result = prune(model, args.method, args.pattern, args.sparsity, calib=calib, targets=args.targets,
                   device=device, offload=args.offload, record_errors=args.errors, progress=True, rotate=rotate,
                   **options)
    report = sparsify(model, masks=result.masks, pattern=args.pattern, backend=args.backend)
    info = {**result.to_dict(), "model": str(args.model), "calibration": None if calib is None else
            {"file": str(args.calib or DEFAULT_CALIB), "nsamples": calib.shape[0], "seqlen": calib.shape[1],
             "seed": args.seed, "sampling": args.calib_sampling, "bos": bos_mode(tok, args.bos)}}
    save_pretrained(model, args.out, tokenizer=tok, extra_config={"pruning": {
        k: info[k] for k in ("method", "pattern", "sparsity", "calibration", "model")} | {"rotation": None if
        rotate is None else {"objective": rotate.objective, "steps": rotate.steps, "blocks": rotate.blocks}}})
    info["out"] = str(args.out)
    info["compression"] = {k: v for k, v in report.to_dict().items() if k != "replaced"}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{args.method} {args.pattern}: pruned {len(result.masks)} linears in {result.seconds:.1f} s "
              f"(achieved sparsity {info['achieved_sparsity']:.3f})", file=sys.stderr)
        for name, why in result.skipped:
            print(f"  skipped {name}: {why}", file=sys.stderr)
        print(report, file=sys.stderr)
        print(f"wrote {args.out}")
    return 0
