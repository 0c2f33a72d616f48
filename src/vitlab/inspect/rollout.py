"""Attention rollout (Abnar & Zuidema, 2020) and reading a token map off an attention matrix."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .capture import capture_attention

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attn: torch.Tensor, head_fusion: HeadFusion = "mean") -> torch.Tensor:
    """Combine the heads of one layer's attention: (B, heads, N, N) -> (B, N, N)."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"unknown head fusion {head_fusion!r}; use one of {', '.join(HEAD_FUSIONS)}")


def attention_rollout(maps: Sequence[torch.Tensor], *, head_fusion: HeadFusion = "mean",
                      discard_ratio: float = 0.0, start_layer: int = 0) -> torch.Tensor:
    """Roll attention out through the layers: list of (B, heads, N, N) -> (B, N, N), float32.

    Per layer from ``start_layer``: fuse the heads; in each query row set the lowest
    ``discard_ratio`` fraction of weights to zero; add the identity (the residual path);
    renormalise the rows; then multiply onto the product of the layers below.
    Entry ``[b, i, j]`` is how much output token ``i`` draws on input token ``j``.
    """
    if not maps:
        raise ValueError("no attention maps to roll out; was anything captured?")
    if not 0 <= start_layer < len(maps):
        raise ValueError(f"start layer {start_layer} is out of range for {len(maps)} layers; use 0..{len(maps) - 1}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard ratio must be in [0, 1), got {discard_ratio}")
    b, _, n, _ = maps[0].shape
    eye = torch.eye(n, device=maps[0].device)
    rollout = eye.expand(b, n, n)
    for attn in maps[start_layer:]:
        a = fuse_heads(attn.float(), head_fusion)
        drop = int(n * discard_ratio)
        if drop:
            lowest = a.topk(drop, dim=-1, largest=False).indices
            a = a.scatter(-1, lowest, 0.0)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def token_map(matrix: torch.Tensor, *, num_prefix_tokens: int, pool: str) -> torch.Tensor:
    """What the pooled output attends to over the patches: (..., N, N) -> (..., N - prefix).

    ``pool="token"`` reads the class-token row; ``pool="gap"`` the mean over the patch rows.
    """
    cols = matrix[..., num_prefix_tokens:]
    if pool == "token":
        if num_prefix_tokens < 1:
            raise ValueError("pool='token' needs a class token")
        return cols[..., 0, :]
    if pool == "gap":
        return cols[..., num_prefix_tokens:, :].mean(dim=-2)
    raise ValueError(f"unknown pool {pool!r}; use 'token' or 'gap'")


def token_grid(num_patches: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) patch grid of ``num_patches`` square cells covering an ``image_size`` image."""
    h, w = image_size
    stride = math.sqrt(h * w / num_patches)
    grid = (round(h / stride), round(w / stride))
    if grid[0] * grid[1] != num_patches:
        raise ValueError(f"{num_patches} patches do not tile a {h}x{w} image in a grid")
    return grid


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor, *, head_fusion: HeadFusion = "mean",
                   discard_ratio: float = 0.0, start_layer: int = 0,
                   batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``model`` attends to in ``images`` (B, C, H, W), as patch grids (float32, on CPU):
    rollout (B, rows, cols), last layer per head (B, heads, rows, cols), and the logits (B, K).
    """
    prefix, pool = model.cfg.num_prefix_tokens, model.cfg.pool
    param = next(model.parameters())
    rollouts, heads, logits = [], [], []
    with capture_attention(model) as maps:
        for start in range(0, len(images), batch_size):
            maps.clear()
            logits.append(model(images[start : start + batch_size].to(param.device, param.dtype)).float().cpu())
            rollout = attention_rollout(maps, head_fusion=head_fusion, discard_ratio=discard_ratio,
                                        start_layer=start_layer)
            rollouts.append(token_map(rollout, num_prefix_tokens=prefix, pool=pool).cpu())
            heads.append(token_map(maps[-1], num_prefix_tokens=prefix, pool=pool).cpu())
    grid = token_grid(rollouts[0].shape[-1], tuple(images.shape[-2:]))
    return torch.cat(rollouts).unflatten(-1, grid), torch.cat(heads).unflatten(-1, grid), torch.cat(logits)
