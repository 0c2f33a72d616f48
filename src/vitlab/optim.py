"""Optimisation: the config, parameter groups, optimisers, the learning-rate schedule, EMA.

The schedule is a pure function of the step (no scheduler object holds state), so resuming
needs only the step. Weight decay is decoupled (AdamW, p <- p - lr * wd * p), which is how
the paper's "Adam with weight decay" works in the official Flax code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .config import check_numbers

Optimizer = Literal["adamw", "adam", "sgd"]
Schedule = Literal["cosine", "linear", "constant"]


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimiser and learning-rate schedule; the defaults are a reasonable AdamW setup."""

    optimizer: Optimizer = "adamw"  # adamw: decoupled decay; adam: L2 added to the gradient; sgd: momentum
    lr: float = 1e-3  # peak learning rate (at lr_batch_size if that is set)
    lr_batch_size: int = 0  # lr is quoted at this batch size and scaled linearly to the real one; 0: as is
    weight_decay: float = 0.05  # not applied to biases, norms, position embeddings, class token
    beta1: float = 0.9
    beta2: float = 0.999
    momentum: float = 0.9  # sgd only
    schedule: Schedule = "cosine"  # decay after warm-up
    warmup_steps: int = 0  # linear warm-up length in steps ...
    warmup_fraction: float = 0.0  # ... or as a fraction of the total steps (set one, not both)
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    clip_grad_norm: float = 1.0  # global-norm clipping; 0 disables

    def __post_init__(self) -> None:
        check_numbers(self, signed=("mean",))
        checks = [
            (self.optimizer in ("adamw", "adam", "sgd"), "optimizer must be adamw, adam or sgd"),
            (self.schedule in ("cosine", "linear", "constant"), "schedule must be cosine, linear or constant"),
            (self.lr > 0, "lr must be > 0"),
            (self.lr_batch_size >= 0, "lr_batch_size must be >= 0 (0: no scaling)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and 0 <= self.momentum < 1,
             "beta1, beta2 and momentum must be in [0, 1)"),
            (self.warmup_steps >= 0 and 0 <= self.warmup_fraction < 1, "warmup_steps >= 0, warmup_fraction in [0, 1)"),
            (not (self.warmup_steps and self.warmup_fraction), "set warmup_steps or warmup_fraction, not both"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.clip_grad_norm >= 0, "clip_grad_norm must be >= 0 (0 disables)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid OptimConfig: {message}")

    def peak_lr(self, batch_size: int) -> float:
        """The peak learning rate for ``batch_size`` (linear scaling from ``lr_batch_size``)."""
        return self.lr * batch_size / self.lr_batch_size if self.lr_batch_size else self.lr

    def warmup(self, total_steps: int) -> int:
        """Warm-up length in steps for a run of ``total_steps``."""
        steps = self.warmup_steps or round(self.warmup_fraction * total_steps)
        if steps >= total_steps > 1:  # a run shorter than its warm-up would end at the peak lr: warm up a tenth
            return max(1, total_steps // 10)
        return min(steps, total_steps)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and biases / norms / ``model.no_weight_decay()`` without decay."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimiser over ``param_groups`` (fused kernels; lr is set every step)."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def lr_at(step: int, *, peak: float, warmup: int, total: int, schedule: Schedule = "cosine",
          min_ratio: float = 0.0) -> float:
    """The learning rate of update ``step`` (0-based) of ``total``.

    Warm-up rises linearly and reaches ``peak`` at the last warm-up update (``step = warmup - 1``);
    the decay then falls to ``peak * min_ratio`` exactly at the last update (``step = total - 1``).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = min((step - warmup + 1) / (total - warmup), 1.0)  # (0, 1]
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return peak * (min_ratio + (1.0 - min_ratio) * shape)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter (one fused call); buffers
    (BatchNorm statistics) are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for mine, theirs in zip(ema.buffers(), model.buffers()):
        mine.copy_(theirs)
