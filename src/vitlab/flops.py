"""Exact analytic FLOPs per image (a multiply-add counts 2; matmuls and convolutions only,
the convention of ``torch.utils.flop_counter.FlopCounterMode``)."""
from __future__ import annotations

from torch import nn

from .config import ViTConfig, as_pair
from .models.vit import VisionTransformer


def vit_flops(cfg: ViTConfig, image_size: int | tuple[int, int] | None = None) -> int:
    """FLOPs of one forward pass of a ViT with ``cfg`` on one image."""
    h, w = as_pair(image_size or cfg.image_size)
    n = (h // cfg.patch_size) * (w // cfg.patch_size)
    t = n + cfg.num_prefix_tokens
    d, m = cfg.width, cfg.mlp_dim
    patch = 2 * n * cfg.in_channels * cfg.patch_size**2 * d
    block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * m  # qkv, qk+av, proj, mlp
    rep = cfg.representation_size
    head = (2 * d * rep if rep else 0) + 2 * (rep or d) * cfg.num_classes
    return patch + cfg.depth * block + head


def count_flops(model: nn.Module, image_size: int | tuple[int, int] | None = None) -> int:
    """FLOPs of one forward pass of ``model`` on one image of ``image_size`` (default: the model's)."""
    if isinstance(model, VisionTransformer):
        return vit_flops(model.cfg, image_size)
    raise TypeError(f"count_flops does not know {type(model).__name__}")
