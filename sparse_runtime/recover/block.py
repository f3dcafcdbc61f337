"""Block-wise reconstruction (as EBFT does): each decoder layer of the student trained, in turn, to reproduce the
dense layer's outputs, with the memory of the layer-wise pruning driver.

The inputs of both models' first decoder layers are captured on the training windows
(:mod:`sparse_runtime.models.layer_walk`); then per layer: only it and the teacher's layer go to the compute
device, the teacher's layer gives the targets (taken into the student's coordinates for a rotated student,
:mod:`.teacher`), the student's layer is trained on its own inputs (so earlier layers' remaining errors are what it
corrects) to minimize the normalized MSE, and its outputs become the next layer's inputs. ``config.tokens`` is the
budget summed over the layers; each gets an equal share of the steps and its own AdamW and schedule."""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..models.architecture import find_decoder_layers
from ..models.layer_walk import capture_inputs, forward_session, run_layer
from .config import RecoverConfig
from .losses import nmse
from .result import RecoverResult, held_out_perplexity
from .state import load_state, restore, save_state
from .steps import autocast, compute_device, optimizer, take_step
from .teacher import into_student, residual_bases
from .trainable import trainable, training_form
from .windows import Windows


def reconstruct(student, teacher, windows: Windows, config: RecoverConfig, evaluate=None) -> RecoverResult:
    """Train ``student``'s decoder layers one at a time toward ``teacher``'s on ``windows.train`` (in place);
    ``evaluate`` as :func:`~.trainer.recover_model`."""
    if teacher is None:
        raise ValueError("block reconstruction needs a teacher (the dense model the checkpoint was pruned from)")
    device = compute_device(config)
    bases = residual_bases(student, teacher)
    with training_form(student):
        return _reconstruct(student, teacher, windows, config, device, bases, evaluate)


def _reconstruct(student, teacher, windows, config, device, bases, extra) -> RecoverResult:
    s_layers, s_path = find_decoder_layers(student)
    t_layers, t_path = find_decoder_layers(teacher)
    teacher.eval().requires_grad_(False)
    per_layer = math.ceil(config.steps / len(s_layers))
    steps, per_step = per_layer * len(s_layers), config.batch * config.seqlen
    everything = trainable(student)
    start, history, saved_opt = 0, {"losses": [], "evals": [], "seconds": 0.0}, None
    state = load_state(config.state, config.identity()) if config.resume else None
    if state is not None:
        restore(state, everything)
        start, history, saved_opt = state["step"], state["history"], state["optimizer"]
    end = min(steps, config.stop_after or steps)

    def evaluate(step):
        home = next(student.parameters()).device
        ppl = held_out_perplexity(student.to(device), windows, device)
        history["evals"].append({"tokens": step * per_step, "step": step, "seconds": history["seconds"], "ppl": ppl,
                                 **(extra(student) if extra else {})})
        student.to(home)

    if start == 0:
        evaluate(0)
    bar = tqdm(total=steps * per_step, initial=start * per_step, unit="tok", unit_scale=True, desc="recover block",
               disable=not config.progress)
    done, inside = start, None  # inside: the optimizer of a layer the session stopped in
    t0 = time.perf_counter()  # the whole walk counts as training time: captures and teacher layers too
    try:
        with forward_session(student, device), forward_session(teacher, device):
            xs, s_kwargs = capture_inputs(student, s_layers, s_path, windows.train, device, device)
            xt, t_kwargs = capture_inputs(teacher, t_layers, t_path, windows.train, device, device)
            xs, xt = torch.cat(xs), torch.cat(xt)
            for i, (s_layer, t_layer) in enumerate(zip(s_layers, t_layers)):
                first, last = i * per_layer, (i + 1) * per_layer
                home = next(s_layer.parameters()).device
                s_layer.to(device)
                t_layer.to(device)
                with torch.no_grad(), autocast(device, config):
                    yt = torch.cat(run_layer(t_layer, xt.split(config.batch), t_kwargs[i], device, device))
                if start < last and done < end:
                    params = [(f"{s_path}.{i}.{n}", p) for n, p in trainable(s_layer)]
                    opt = optimizer(params, config)
                    if saved_opt is not None and first < start:
                        opt.load_state_dict(saved_opt)
                    target = into_student(yt, None if bases is None else bases[i])
                    s_layer.train()
                    for k in range(max(start, first) - first, min(end, last) - first):
                        rows = windows.rows(first + k, config.batch, config.seed).to(device)
                        with autocast(device, config):
                            y = s_layer(xs[rows], **s_kwargs[i])
                        loss = nmse(y[0] if isinstance(y, (tuple, list)) else y, target[rows])
                        loss.backward()
                        take_step(opt, params, config, k, per_layer)
                        done = first + k + 1
                        value = float(loss.detach())
                        history["losses"].append({"step": done, "tokens": done * per_step, "loss": value,
                                                  "lr": opt.param_groups[0]["lr"], "layer": i})
                        bar.set_postfix(layer=i, loss=f"{value:.4f}", refresh=False)
                        bar.update(per_step)
                        if config.save_every and done % config.save_every == 0 and done < end:
                            save_state(config.state, done, everything, opt if done < last else None,
                                       config.identity(), history)
                    s_layer.eval()
                    if done == end and end < last:  # stopped inside this layer: the state holds its optimizer
                        inside = opt
                        break
                with torch.no_grad(), autocast(device, config):
                    xs = torch.cat(run_layer(s_layer, xs.split(config.batch), s_kwargs[i], device, device)).float()
                xt = yt
                s_layer.to(home)
                t_layer.to(home)
    except KeyboardInterrupt:
        if config.state:
            save_state(config.state, done, everything, None, config.identity(), history)
        raise
    finally:
        history["seconds"] += time.perf_counter() - t0
        bar.close()
        student.eval()
    if done == steps:
        evaluate(steps)
    if config.state and (done < steps or config.save_every):
        save_state(config.state, done, everything, inside, config.identity(), history)
    return RecoverResult(config.to_dict(), done, steps, done * per_step, history["seconds"], done == steps,
                         history["evals"], history["losses"], windows.info)
