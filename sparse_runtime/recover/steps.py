"""One optimizer step as both recovery drivers take it: AdamW on the trainable tensors at the step's learning rate
(:func:`~.config.lr_at`), gradients clipped, the forward under bf16 autocast where the device multiplies bf16
natively (master weights stay float32)."""
from __future__ import annotations

import contextlib

import torch

from ..ops.devices import cpu_native_bf16
from .config import RecoverConfig, lr_at
from .trainable import CODES


def compute_device(config: RecoverConfig) -> torch.device:
    return torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast(device: torch.device, config: RecoverConfig):
    """bf16 autocast on a device with native bf16 matmuls (CUDA Ampere and newer; CPUs with AVX512-BF16 or AMX),
    unless ``config.autocast`` says otherwise; a null context elsewhere."""
    on = config.autocast
    if on is None:
        on = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_native_bf16()
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def optimizer(params, config: RecoverConfig) -> torch.optim.Optimizer:
    """AdamW: quantized layers' codes (:data:`~.trainable.CODES`) peak at ``code_lr``, the rest at ``lr``; the
    first group is the float tensors' (what the history logs), present even when empty."""
    codes = [p for n, p in params if n.endswith(CODES)]
    groups = [{"params": [p for n, p in params if not n.endswith(CODES)], "peak": config.lr}]
    groups += [{"params": codes, "peak": config.code_lr, "weight_decay": 0.0}] if codes else []
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def take_step(opt: torch.optim.Optimizer, params, config: RecoverConfig, step: int, steps: int) -> float:
    """Clip, set the learning rate of ``step`` of ``steps``, step, zero the gradients; returns the gradient norm."""
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], config.clip)
    for group in opt.param_groups:
        group["lr"] = lr_at(config, step, steps, group["peak"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)
