"""Recovery fine-tuning end to end: the whole student model trained on the training windows with logit KD,
SquareHead or cross-entropy, masks frozen (:mod:`.trainable`), the held-out perplexity measured as it goes, the
state saved for a resume; and :func:`recover`, which loads a checkpoint and its teacher, runs it (or block-wise
reconstruction, :mod:`.block`) and writes the result as a sparse checkpoint."""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ..data.calibration import DEFAULT_CALIB, context_length
from ..errors import CheckpointError
from ..models.checkpoint import read_sparse_config, save_pretrained
from ..models.sources import load_model, resolve
from . import losses
from .block import reconstruct
from .config import RecoverConfig
from .result import RecoverResult, held_out_perplexity
from .state import load_state, restore, save_state
from .steps import autocast, compute_device, optimizer, take_step
from .teacher import check_vocabulary, residual_bases
from .trainable import trainable, trainable_layers, training_form
from .windows import Windows, recovery_windows


def recover_model(student, teacher, windows: Windows, config: RecoverConfig, log=None,
                  evaluate=None) -> RecoverResult:
    """Fine-tune ``student`` (with SparseLinear layers) in place toward ``teacher`` (None for ``ce``) on
    ``windows``; the masks never change. Returns the curve and timings; ``finished`` is False when
    ``config.stop_after`` ended the session first (the state is saved, ``resume`` continues). ``evaluate(model)
    -> dict``, if given, adds its measurements to each point of the curve (another text's perplexity)."""
    if config.loss == "block":
        return reconstruct(student, teacher, windows, config, evaluate)
    if teacher is None and config.loss != "ce":
        raise ValueError(f"loss {config.loss} needs a teacher model")
    device = compute_device(config)
    bases = residual_bases(student, teacher) if config.loss == "squarehead" else None
    with training_form(student, config.embeddings):
        return _train(student, teacher, windows, config, device, bases, log, evaluate)


def _train(student, teacher, windows, config, device, bases, log, extra) -> RecoverResult:
    params = trainable(student)
    opt = optimizer(params, config)
    steps, per_step = config.steps, config.batch * config.seqlen
    start, history = 0, {"losses": [], "evals": [], "seconds": 0.0}
    state = load_state(config.state, config.identity()) if config.resume else None
    if state is not None:
        restore(state, params)
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
    end = min(steps, config.stop_after or steps)
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        teacher.requires_grad_(False)
    features = config.loss == "squarehead"
    s_out = losses.LayerOutputs(student) if features else None
    t_out = losses.LayerOutputs(teacher) if features else None

    best = {}  # keep_best: the held-out perplexity, step and trained tensors of the best evaluation so far

    def evaluate(step):
        ppl = held_out_perplexity(student, windows, device)
        if config.keep_best and ppl < best.get("ppl", float("inf")):
            best.update(ppl=ppl, step=step, tensors=[p.detach().clone() for _, p in params])
        history["evals"].append({"tokens": step * per_step, "step": step, "seconds": history["seconds"], "ppl": ppl,
                                 **(extra(student) if extra else {})})
        shown["ppl"] = f"{ppl:.2f}"
        bar.set_postfix(shown, refresh=False)

    def save(step):
        save_state(config.state, step, params, opt, config.identity(), history)

    student.train()
    checkpointing = config.checkpointing and _checkpointing(student, True)
    bar = tqdm(total=steps * per_step, initial=start * per_step, unit="tok", unit_scale=True,
               desc=f"recover {config.loss}", disable=not config.progress)
    shown = {}  # the bar's postfix: last loss, last held-out perplexity
    done = start
    try:
        if start == 0:
            evaluate(0)
        for step in range(start, end):
            t0 = time.perf_counter()
            ids = windows.batch(step, config.batch, config.seed).to(device)
            loss = _loss(student, teacher, ids, config, device, s_out, t_out, bases)
            loss.backward()
            take_step(opt, params, config, step, steps)
            done = step + 1
            value = float(loss.detach())  # waits for the device: the step's time is its own
            history["seconds"] += time.perf_counter() - t0
            history["losses"].append({"step": step + 1, "tokens": (step + 1) * per_step, "loss": value,
                                      "lr": opt.param_groups[0]["lr"]})
            shown["loss"] = f"{value:.4f}"
            bar.set_postfix(shown, refresh=False)
            bar.update(per_step)
            if (config.eval_every and done * per_step // config.eval_every > step * per_step // config.eval_every
                    or done == steps):
                evaluate(done)
            if config.save_every and done % config.save_every == 0 and done < end:
                save(done)
    except KeyboardInterrupt:
        if config.state:
            save(done)
            (log or _stderr)(f"interrupted: state after step {done} saved to {config.state}")
        raise
    finally:
        bar.close()
        if checkpointing:
            _checkpointing(student, False)
        for hooks in (s_out, t_out):
            if hooks is not None:
                hooks.remove()
        student.eval()
    if config.state and (end < steps or config.save_every):
        save(end)
    kept = None
    if best:
        with torch.no_grad():
            for (_, p), t in zip(params, best["tensors"]):
                p.copy_(t)
        kept = {"step": best["step"], "tokens": best["step"] * per_step, "ppl": best["ppl"]}
    return RecoverResult(config.to_dict(), end, steps, end * per_step, history["seconds"], end == steps,
                         history["evals"], history["losses"], windows.info, kept=kept)


def _loss(student, teacher, ids, config, device, s_out, t_out, bases) -> torch.Tensor:
    with autocast(device, config):
        if teacher is not None:
            with torch.no_grad(), nullcontext() if t_out is None else t_out.recording() as t_states:
                t_logits = teacher(input_ids=ids, use_cache=False).logits
        with nullcontext() if s_out is None else s_out.recording() as s_states:
            logits = student(input_ids=ids, use_cache=False).logits
    if config.loss == "ce":
        return losses.ce(logits, ids)
    loss = losses.kd(logits, t_logits, config.temperature)
    if config.loss == "squarehead":
        loss = loss + losses.squarehead(s_states, t_states, bases)
    return loss


def _checkpointing(model, on: bool) -> bool:
    """Turn transformers' activation checkpointing of the decoder layers on or off; False where the model has none
    (``activation_*`` in transformers 5, ``gradient_*`` before)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    return True


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def recover(model, teacher=None, data=DEFAULT_CALIB, out=None, config: RecoverConfig | None = None, *,
            forbid=(), log=None, evaluate=None, **fields) -> RecoverResult:
    """Recover the sparse checkpoint ``model`` (a folder) by fine-tuning its kept weights toward ``teacher`` (the
    dense model it was pruned from, or any with its tokenizer: a folder, GGUF file or known name) on windows of
    ``data`` (not the documents its calibration used; never an evaluation text, nor a file in ``forbid``), and
    write the result to ``out`` atomically, masks bit-identical. ``config`` or its ``fields``
    (``loss="kd", tokens=..., lr=...``) say how; see :class:`RecoverConfig`; ``evaluate`` as
    :func:`recover_model`."""
    config = (config or RecoverConfig()).replace(**fields) if fields else (config or RecoverConfig())
    if teacher is None and config.loss != "ce":
        raise ValueError(f"loss {config.loss} needs a teacher (the dense model the checkpoint was pruned from)")
    device = compute_device(config)
    home = torch.device("cpu") if config.loss == "block" else device  # block: one layer on the device at a time
    try:
        record = read_sparse_config(resolve(model)).get("pruning") or {}
    except CheckpointError:
        record = {}  # another sparse format (compressed-tensors): no calibration record
    student, tok = load_model(model, device=home)
    trainable_layers(student)  # a model recovery cannot train is refused before the teacher loads
    teacher_model = None
    if teacher is not None:
        teacher_model, teacher_tok = load_model(teacher, device=home)
        check_vocabulary(student, teacher_model, tok, teacher_tok)
    context = context_length(student)
    if context and config.seqlen > context:
        (log or _stderr)(f"seqlen {config.seqlen} clipped to the model's context {context}")
        config = config.replace(seqlen=context)
    wanted = config.block_windows if config.loss == "block" else config.steps * config.batch
    windows = recovery_windows(tok, data, wanted, config.seqlen, config.eval_windows, record.get("calibration"),
                               forbid)
    result = recover_model(student, teacher_model, windows, config, log, evaluate)
    if result.finished and out is not None:
        keep = {k: v for k, v in (("pruning", record),) if v}
        save_pretrained(student, out, tokenizer=tok, extra_config={**keep, "recovery": result.summary()})
        result.out = str(out)
    return result
