"""``sparse-runtime prune``: prune a model layer by layer and write a compressed sparse checkpoint."""
from __future__ import annotations

import argparse
import json
import sys

HELP = ("prune a model (magnitude, Wanda, SparseGPT) to 2:4 / N:M / unstructured, optionally quantized (int8, "
        "int4, fp8), and save a sparse checkpoint")


def add_calibration_arguments(p) -> None:
    from ..data.calibration import SAMPLINGS
    from .common import add_bos_argument

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


def calibration_from_args(args, tok, model, used=None):
    from ..prune import DEFAULT_CALIB, calibration_windows
    from ..data.calibration import context_length

    return calibration_windows(tok, args.calib or DEFAULT_CALIB, args.nsamples, args.seqlen, args.seed,
                               max_seqlen=context_length(model), sampling=args.calib_sampling, bos=args.bos,
                               used=used)


def add_arguments(p) -> None:
    from ..format.quant import SCHEMES
    from ..nn.int8_dense import HEAD_SCHEMES
    from ..prune import METHODS, ROTATE_OBJECTIVES
    from ..prune.allocation import STRATEGIES
    from ..prune.atp_search import STATISTICS as BETA_STATISTICS
    from .common import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--method", default="sparsegpt", choices=list(METHODS))
    p.add_argument("--pattern", default="2:4", help="N:M (2:4, 4:8, ...) or 'unstructured' (default: 2:4)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned for unstructured (default: 0.5)")
    add_calibration_arguments(p)
    p.add_argument("--allocation", choices=STRATEGIES, default="uniform",
                   help="sparsity per decoder block: uniform, atp (rising with depth by beta), owl (outlier ratios), "
                        "alphapruning (spectra); the parameter-weighted mean stays --sparsity (for N:M, 1 - N/M "
                        "with a per-block N of the same M) (default: uniform)")
    beta = p.add_mutually_exclusive_group()
    beta.add_argument("--beta", type=float, default=None, help="atp: the step of sparsity between adjacent blocks")
    beta.add_argument("--beta-search", action="store_true",
                      help="atp: try the paper's beta grid, keep the lowest perplexity on --val (C4 documents "
                           "disjoint from the calibration windows)")
    p.add_argument("--beta-step", type=float, default=0.002, help="beta grid step (default: 0.002, the paper's)")
    p.add_argument("--beta-patience", type=int, default=None,
                   help="stop the search after this many betas in a row worse than the best (default: whole grid)")
    p.add_argument("--beta-statistics", choices=BETA_STATISTICS, default="dense",
                   help="beta-search trials prune from the dense model's statistics (one pass, fast) or layer by "
                        "layer (the paper's protocol); the chosen beta is always pruned layer by layer (default: dense)")
    p.add_argument("--val", default=None, help="beta-search validation text (default: the C4 calibration file, "
                                               "documents not used for calibration)")
    p.add_argument("--val-windows", type=int, default=16, help="validation windows of --seqlen (default: 16)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="owl: rates span S +- lambda (default: 0.08)")
    p.add_argument("--owl-m", type=float, default=5.0, help="owl: outlier threshold, M x mean score (default: 5)")
    p.add_argument("--alpha-eps", type=float, default=0.2, help="alphapruning: spread eps (default: 0.2)")
    p.add_argument("--plan", default=None,
                   help="a deployment plan from `sparse-runtime plan`: its 2:4 linears are pruned 2:4, the rest "
                        "stay dense")
    p.add_argument("--plot", default=None,
                   help="PNG of sparsity vs depth (default with an allocation: OUT_allocation.png beside OUT)")
    p.add_argument("--targets", nargs="+", default=None,
                   help="linears to prune (globs or trailing names); default: every linear in the decoder layers")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block (default: 128)")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT damping, fraction of mean diag(H)")
    p.add_argument("--refit", type=int, default=0, metavar="STEPS",
                   help="SparseGPT: re-solve the kept weights on its mask, least squares by this many "
                        "conjugate-gradient steps (default: 0, plain SparseGPT)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate each group of a layer's linears on the outputs of the groups pruned before it "
                        "(default: on for SparseGPT, off for Wanda, as in their papers)")
    p.add_argument("--rotate", choices=["none", *ROTATE_OBJECTIVES], default="none",
                   help="learn DenoiseRotator rotations per decoder layer before pruning it: the paper's entropy, "
                        "or nm, the importance the pattern's mask drops (default: none)")
    p.add_argument("--rotate-steps", type=int, default=100, help="Adam steps per decoder layer (default: 100)")
    p.add_argument("--rotate-blocks", type=int, default=1,
                   help="diagonal blocks of the residual rotation R1 (default: 1, a full d x d rotation)")
    p.add_argument("--rotate-importance", choices=["magnitude", "wanda", "sparsegpt"],
                   help="whose scores the rotation objective sees (default: the pruning method's own; "
                        "wanda suits sparsegpt at 2:4, see README)")
    p.add_argument("--quantize", choices=SCHEMES, default=None,
                   help="also quantize the kept weights: int8 or fp8 (one scale per output row) or int4 (one per "
                        "row and --group-size input columns); magnitude and Wanda round to nearest after masking, "
                        "SparseGPT quantizes in its sweep (default: none, full precision)")
    p.add_argument("--quantize-after", action="store_true",
                   help="prune in full precision first, then quantize the pruned layers by GPTQ on the fixed masks (a "
                        "second calibrated pass): the masks of the full-precision prune exactly")
    p.add_argument("--scale-search", action="store_true",
                   help="choose each quantization group's scale by a clipping search (least rounding error over "
                        "fractions 1.0-0.5 of the absmax) instead of the absmax (default: absmax)")
    p.add_argument("--sink-weight", type=float, default=1.0,
                   help="sparsegpt/gptq: the first token of each calibration window counts this many times in the key "
                        "and value projections' Hessians (the attention sink every later query reads; the window "
                        "length --seqlen is a good choice); default 1: every token alike")
    p.add_argument("--group-size", type=int, default=None,
                   help="input columns per scale (int4 default 128; it must divide every pruned layer's in_features)")
    p.add_argument("--quantize-head", choices=HEAD_SCHEMES, default=None,
                   help="also hold the embedding and the lm_head (left dense) as int8 codes, one scale per row; a "
                        "tied pair stays one tensor (default: none, as loaded)")
    add_schedule_arguments(p)
    p.add_argument("--offload", action="store_true", help="keep calibration activations on the CPU")
    p.add_argument("--errors", action="store_true", help="report ||WX - W_hat X|| / ||WX|| per linear")
    p.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")


def add_schedule_arguments(p) -> None:
    from ..recover.config import LOSSES, RecoverConfig

    d = RecoverConfig()
    p.add_argument("--schedule", choices=["oneshot", "gradual"], default="oneshot",
                   help="oneshot: prune once; gradual: --steps K prunes, at sparsities rising on a cubic schedule to "
                        "the target (N:M: never more than M-N of a group; the last step at N:M exactly), each "
                        "followed by --recover-tokens/K tokens of recovery, a pruned weight never coming back "
                        "(default: oneshot)")
    p.add_argument("--steps", type=int, default=None, help="gradual: pruning steps K")
    p.add_argument("--recover-tokens", type=int, default=None, metavar="N",
                   help="recover after pruning: fine-tune the kept weights by distillation from the dense model, "
                        "masks frozen, N tokens in all (oneshot: one phase after the prune; gradual: shared out "
                        "over the steps)")
    p.add_argument("--teacher", default=None, help="the dense teacher of the recovery (default: --model)")
    p.add_argument("--recover-loss", choices=[x for x in LOSSES if x != "block"], default=None,
                   help=f"recovery loss (default: {d.loss}; see `recover --help`)")
    p.add_argument("--recover-lr", type=float, default=None, help=f"recovery AdamW peak lr (default: {d.lr:g})")
    p.add_argument("--recover-seqlen", type=int, default=None,
                   help=f"recovery window length (default: {d.seqlen})")
    p.add_argument("--recover-batch", type=int, default=None, help=f"recovery windows per step (default: {d.batch})")
    p.add_argument("--recover-data", default=None,
                   help="recovery training text (default: the shared C4 sample, less the calibration documents)")


def _recovery(args):
    """The recovery the schedule flags ask for (None: none), their contradictions refused before the model loads."""
    from ..gradual import phase_steps
    from ..recover import RecoverConfig

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps takes a number of pruning steps >= 1, not {args.steps}")
    if args.schedule == "gradual":
        if args.steps is None:
            raise ValueError("--schedule gradual needs --steps K")
        if args.recover_tokens is None:
            raise ValueError("--schedule gradual needs --recover-tokens N: each pruning step is followed by "
                             "N/K tokens of recovery")
    elif args.steps is not None:
        raise ValueError("--steps belongs to --schedule gradual")
    given = {k: getattr(args, k) for k in ("teacher", "recover_loss", "recover_lr", "recover_seqlen",
                                           "recover_batch", "recover_data")}
    if args.recover_tokens is None:
        if any(v is not None for v in given.values()):
            raise ValueError("--teacher and --recover-* belong to a recovery: give --recover-tokens N")
        return None
    if args.rotate != "none" or args.allocation != "uniform" or args.plan is not None:
        raise ValueError("--recover-tokens prunes every block alike in fixed coordinates: it takes no --rotate, "
                         "--allocation or --plan (prune, then `sparse-runtime recover` the checkpoint)")
    if args.quantize is not None:
        raise ValueError("--recover-tokens recovers in full precision between prunes, off the --quantize grid: "
                         "prune with --quantize, then `sparse-runtime recover` the checkpoint (it trains on the grid)")
    fields = {k.removeprefix("recover_"): v for k, v in given.items()
              if k not in ("teacher", "recover_data") and v is not None}
    recovery = RecoverConfig(tokens=args.recover_tokens, device=args.device, **fields)
    phase_steps(recovery, args.steps or 1)
    return recovery


def _config(args):
    """The prune the flags ask for, its contradictions refused before the slow model load."""
    from ..prune import PruneConfig

    if (args.beta is not None or args.beta_search) and args.allocation != "atp":
        raise ValueError("--beta and --beta-search belong to --allocation atp")
    if args.allocation == "atp" and args.beta is None and not args.beta_search:
        raise ValueError("--allocation atp needs --beta B or --beta-search")
    if args.beta_search and args.rotate != "none":
        raise ValueError("--beta-search with --rotate is not supported (each trial would relearn the rotations)")
    if args.refit < 0:
        raise ValueError(f"--refit takes a number of steps >= 0, not {args.refit}")
    if args.refit and args.method != "sparsegpt":
        raise ValueError("--refit re-solves SparseGPT's kept weights: it takes --method sparsegpt")
    if args.plan is not None and (args.allocation != "uniform" or args.pattern != "2:4"):
        raise ValueError("--plan decides 2:4 or dense per linear: it takes --pattern 2:4 and no --allocation")
    return PruneConfig(args.method, args.pattern, args.sparsity, targets=args.targets, device=args.device,
                       true_sequential=args.true_sequential, offload=args.offload, record_errors=args.errors,
                       rotate=args.rotate, rotate_steps=args.rotate_steps, rotate_blocks=args.rotate_blocks,
                       rotate_importance=args.rotate_importance, blocksize=args.blocksize, damp=args.damp,
                       refit=args.refit, per=args.per, quantize=args.quantize, group_size=args.group_size,
                       quantize_after=args.quantize_after, scale_search=args.scale_search,
                       sink_weight=args.sink_weight)


def _sparsify(model, result, backend):
    """SparseLinear for every pruned linear, each with the pattern it was pruned to (mixed N:M differ); a quantized
    prune's weights are stored as codes under the prune's own scales (its weights are already on that grid)."""
    from ..nn.sparsify import SparsifyReport, sparsify

    report = SparsifyReport()
    for pattern in sorted(set(result.patterns.values())):
        names = [n for n, p in result.patterns.items() if p == pattern]
        quantized = {} if result.quant is None else {"quant": result.quant,
                                                     "scales": {n: result.scales[n] for n in names}}
        part = sparsify(model, masks={n: result.masks[n] for n in names}, pattern=pattern, backend=backend,
                        **quantized)
        report.replaced += part.replaced
        report.skipped += part.skipped
    return report


def _prune_and_recover(args, model, tok, config, recovery, calib, calibration, dtype):
    """Prune on ``args.schedule`` with recovery phases toward the dense teacher (:mod:`sparse_runtime.gradual`)."""
    from ..data.calibration import DEFAULT_CALIB, context_length
    from ..gradual import prune_gradually
    from ..models.sources import load_model
    from ..recover import recovery_windows
    from ..recover.teacher import check_vocabulary

    teacher, teacher_tok = load_model(args.teacher or args.model, device="cpu", dtype=dtype)
    check_vocabulary(model, teacher, tok, teacher_tok)
    context = context_length(model)
    if context and recovery.seqlen > context:
        print(f"recovery seqlen {recovery.seqlen} clipped to the model's context {context}", file=sys.stderr)
        recovery = recovery.replace(seqlen=context)
    windows = recovery_windows(tok, args.recover_data or DEFAULT_CALIB, recovery.steps * recovery.batch,
                               recovery.seqlen, recovery.eval_windows, calibration)
    return prune_gradually(model, teacher, config, recovery, windows, args.steps or 1, calib=calib,
                           backend=args.backend)


def run(args) -> int:
    from ..models.checkpoint import save_pretrained
    from ..format.codec import parse_pattern
    from ..models.sources import load_model
    from ..nn.int8_dense import quantize_head
    from ..prune import DEFAULT_CALIB, prune
    from ..data.calibration import bos_mode
    from .common import device_dtype

    config = _config(args)
    recovery = _recovery(args)
    plan = None
    if args.plan is not None:
        from ..prune.plan import DeploymentPlan

        plan = DeploymentPlan.load(args.plan)
    device, dtype = device_dtype(args)
    model, tok = load_model(args.model, device="cpu", dtype=dtype)  # layers visit `device` one at a time
    calib, used = None, set()
    if args.method != "magnitude":
        calib = calibration_from_args(args, tok, model, used)
    if plan is not None:
        plan.check_model(model)
        config = config.replace(targets=plan.sparse)
    nm = parse_pattern(args.pattern)
    target = 1 - nm[0] / nm[1] if nm else args.sparsity
    allocation = search = result = None
    if args.beta_search:
        from ..prune.atp_search import search_beta
        from ..data.calibration import validation_windows

        val_file = args.val or DEFAULT_CALIB
        same = str(val_file) == str(args.calib or DEFAULT_CALIB)
        val = validation_windows(tok, val_file, args.val_windows, calib.shape[1] if calib is not None else args.seqlen,
                                 exclude=used if same else set(), bos=args.bos)
        search = search_beta(model, config.replace(sparsity=target), calib, val, step=args.beta_step,
                             patience=args.beta_patience, statistics=args.beta_statistics,
                             log=lambda m: print(m, file=sys.stderr))
        allocation, result = search.allocation, search.result
    elif args.allocation != "uniform" or args.plot:
        from ..prune.allocation import allocate

        allocation = allocate(model, args.allocation, target, pattern=args.pattern, calib=calib, beta=args.beta,
                              lam=args.owl_lambda, m=args.owl_m, eps=args.alpha_eps, targets=config.targets,
                              device=device)
    calibration = None if calib is None else {
        "file": str(args.calib or DEFAULT_CALIB), "nsamples": calib.shape[0], "seqlen": calib.shape[1],
        "seed": args.seed, "sampling": args.calib_sampling, "bos": bos_mode(tok, args.bos)}
    gradual = None
    if recovery is not None:
        gradual = _prune_and_recover(args, model, tok, config, recovery, calib, calibration, dtype)
        result, report = gradual.prune, gradual.report
    else:
        if result is None:
            result = prune(model, config, calib=calib, allocation=allocation)
        report = _sparsify(model, result, args.backend)
    if args.quantize_head is not None:
        report.head = quantize_head(model, args.quantize_head)
    info = {**result.to_dict(), "model": str(args.model), "calibration": calibration}
    info["plan"] = None if plan is None else {"file": str(args.plan), "strategy": plan.strategy,
                                              "fraction": plan.fraction, "predicted_speedup": plan.speedup}
    scheduled, recovered = ({}, {}) if gradual is None else (
        {"schedule": {"kind": args.schedule, **gradual.schedule()}}, {"recovery": gradual.summary()})
    save_pretrained(model, args.out, tokenizer=tok, extra_config={"pruning": {
        k: info[k] for k in ("method", "pattern", "sparsity", "calibration", "model", "allocation", "plan",
                             "quantization")} | {
        "options": config.method_options(), "rotation": None if config.rotate is None else
        {"objective": config.rotate.objective, "steps": config.rotate.steps, "blocks": config.rotate.blocks},
        **scheduled}, **recovered})
    info["out"] = str(args.out)
    if gradual is not None:
        info["recovery"] = gradual.to_dict()
    info["compression"] = {k: v for k, v in report.to_dict().items() if k != "replaced"}
    if allocation is not None:
        from ..prune.allocation import plot_rates

        info["allocation_plot"] = str(args.plot or f"{str(args.out).rstrip('/')}_allocation.png")
        plot_rates([allocation], info["allocation_plot"], title=f"{args.model}: {args.method} {allocation.strategy}, "
                   f"mean sparsity {allocation.sparsity:g} ({args.pattern})")
        print(allocation.table(), file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        quantized = "" if result.quant is None else f" + {result.quant.name}"
        print(f"{args.method} {args.pattern}{quantized}: pruned {len(result.masks)} linears in {result.seconds:.1f} s "
              f"(achieved sparsity {info['achieved_sparsity']:.3f})", file=sys.stderr)
        if gradual is not None:
            held = gradual.summary()["held_out_ppl"]
            print(f"{args.schedule} in {len(gradual.steps)} step(s), {gradual.tokens:,} recovery tokens in "
                  f"{gradual.seconds:.1f} s; held-out perplexity after the first step {held['first_step']:.2f}, "
                  f"at the end {held['after']:.2f}", file=sys.stderr)
        for name, why in result.skipped:
            print(f"  skipped {name}: {why}", file=sys.stderr)
        print(report, file=sys.stderr)
        if info.get("allocation_plot"):
            print(f"allocation plot: {info['allocation_plot']}", file=sys.stderr)
        print(f"wrote {args.out}")
    return 0
