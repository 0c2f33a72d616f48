"""Inference mode: eval, no parameter gradients, weights cast once to the compute dtype."""
from __future__ import annotations

import torch
from torch import nn


def optimize(model: nn.Module, dtype: torch.dtype | None = None, *, device: torch.device | str | None = None) -> nn.Module:
    """Prepare ``model`` for inference in place and return it.

    Sets eval mode, turns off ``requires_grad`` (so attention picks its inference kernels even
    outside ``torch.no_grad()``) and casts the weights once to ``dtype`` (e.g. ``torch.bfloat16``)
    on ``device``, so no cast happens per call as under autocast. Inputs are cast to the weights'
    dtype by the patch embedding, so fp32 images can be passed as they are. (``torch.compile``
    with inductor's weight freezing on top was measured and is not faster at 2 threads:
    ``benchmarks/RESULTS.md``.)
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype such as torch.bfloat16, got {dtype}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
