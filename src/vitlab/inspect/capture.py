"""Attention capture: hooks that read the explicit-softmax weights and leave the model alone."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..models.vit import Attention


def attention_modules(model: nn.Module) -> list[Attention]:
    """Every ``vitlab.models.vit.Attention`` in ``model``, in forward (registration) order."""
    return [m for m in model.modules() if isinstance(m, Attention)]


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """``with capture_attention(model) as maps: model(x)`` -> ``maps[i]``: (B, heads, N, N), float32.

    A forward pre-hook on each attention module recomputes ``module.attention_weights`` from the
    module's input (the normed tokens), so the model's own forward (fused or explicit) and its
    outputs are untouched. One entry is appended per attention call: one per layer for one forward
    pass (call ``maps.clear()`` between passes). Weights are detached; hooks go away on exit.
    """
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no vitlab Attention modules to capture")
    maps: list[torch.Tensor] = []

    def hook(module: Attention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["x"]
        with torch.no_grad():
            maps.append(module.attention_weights(x).float())

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
