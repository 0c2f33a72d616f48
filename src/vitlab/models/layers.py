"""Small layers and checks shared by the model files: image checks, a zero head, stochastic depth,
layer scale, patch dropout."""
from __future__ import annotations

import torch
from torch import nn


def check_images(x: torch.Tensor, in_channels: int, stride: int = 1, what: str = "") -> None:
    """A ValueError naming the expected and actual shape unless ``x`` is (B, in_channels, H, W)
    with H and W divisible by ``stride`` (``what`` names the stride in the message)."""
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} channels, got {x.shape[1]} (shape {tuple(x.shape)}; "
                         f"expected (B, {in_channels}, H, W))")
    h, w = x.shape[-2:]
    if h % stride or w % stride:
        raise ValueError(f"image size {h}x{w} is not divisible by {what or stride}")


def zero_head(num_features: int, num_classes: int, like: torch.Tensor | None = None) -> nn.Module:
    """A zero-initialised linear head (an identity for 0 classes), on ``like``'s device and dtype."""
    if not num_classes:
        return nn.Identity()
    head = nn.Linear(num_features, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head if like is None else head.to(device=like.device, dtype=like.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = torch.empty(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype)
        return x * keep.bernoulli_(1.0 - self.rate) / (1.0 - self.rate)


class LayerScale(nn.Module):
    """x * gamma, one learned scale per channel (CaiT, Touvron et al. 2021; timm's ``ls1``/``ls2``)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_patches(x: torch.Tensor, rate: float, num_prefix_tokens: int) -> torch.Tensor:
    """PatchDropout (Liu et al. 2022): keep a random ``1 - rate`` of each image's patch tokens.

    (B, prefix + N, D) -> (B, prefix + K, D), K = round(N * (1 - rate)); prefix tokens are kept.
    """
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    b, n, d = patches.shape
    keep = max(1, round(n * (1.0 - rate)))
    idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep]  # (B, K)
    return torch.cat([prefix, patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))], dim=1)
