"""Mean attention distance (paper Fig. 7 right): how far, in pixels, each head looks."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from .capture import capture_attention
from .rollout import token_grid


def patch_distances(grid: tuple[int, int], cell: tuple[float, float]) -> torch.Tensor:
    """Pixel distances between all patch centres, (M, M) with M = rows * cols (row-major)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([(rows.flatten() + 0.5) * cell[0], (cols.flatten() + 0.5) * cell[1]], dim=1).double()
    return torch.cdist(centres, centres).float()


def attention_distance(attn: torch.Tensor, *, grid: tuple[int, int], cell: tuple[float, float],
                       num_prefix_tokens: int) -> torch.Tensor:
    """Per image and head, the attention-weighted query-key distance: (B, heads, N, N) -> (B, heads).

    Only patch tokens count: the patch-to-patch weights of each query are renormalised to sum
    to 1, weighted distances are summed over keys and averaged over queries.
    """
    w = attn[..., num_prefix_tokens:, num_prefix_tokens:].float()
    w = w / w.sum(dim=-1, keepdim=True)
    dist = patch_distances(grid, cell).to(w.device)
    return (w * dist).sum(dim=-1).mean(dim=-1)


@torch.no_grad()
def mean_attention_distance(model: nn.Module, images: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """Mean attention distance in pixels of every layer and head over ``images`` (B, C, H, W): (layers, heads)."""
    if images.ndim != 4 or not len(images):
        raise ValueError(f"expected a non-empty batch of images (B, C, H, W), got {tuple(images.shape)}")
    prefix = model.cfg.num_prefix_tokens
    param = next(model.parameters())
    total: torch.Tensor | None = None
    with capture_attention(model) as maps:
        for start in tqdm(range(0, len(images), batch_size), desc="attention distance", leave=False, disable=None):
            maps.clear()
            model(images[start : start + batch_size].to(param.device, param.dtype))
            grid = token_grid(maps[0].shape[-1] - prefix, tuple(images.shape[-2:]))
            cell = (images.shape[-2] / grid[0], images.shape[-1] / grid[1])
            per_layer = torch.stack([attention_distance(a, grid=grid, cell=cell, num_prefix_tokens=prefix) for a in maps])
            batch_sum = per_layer.sum(dim=1)  # (layers, B, heads) -> (layers, heads)
            total = batch_sum if total is None else total + batch_sum
    return (total / len(images)).cpu()
