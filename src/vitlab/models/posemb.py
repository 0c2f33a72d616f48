"""Position embeddings: resampling to a new patch grid, and 2-D sin-cos tables."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_posemb(
    posemb: torch.Tensor,
    new_grid: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
    mode: str = "bicubic",
    antialias: bool = False,
) -> torch.Tensor:
    """Resample ``(1, prefix + gh*gw, D)`` position embeddings to ``new_grid`` (gh', gw').

    Prefix ([class]) tokens are kept as they are. Modes: ``"bilinear"``/``"bicubic"``
    (torch, ``align_corners=False``, as timm and Hugging Face do) and ``"scipy"`` (linear
    with corner alignment: exactly ``scipy.ndimage.zoom(order=1)``, as the official code).
    """
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"position embeddings must be (1, N, D), got {tuple(posemb.shape)}")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    n = grid.shape[1]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} position embeddings are not a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not hold {n} position embeddings")
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    dim = grid.shape[-1]
    dtype = grid.dtype
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = grid.to(torch.promote_types(dtype, torch.float32))
    if mode == "scipy":
        grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=True)
    elif mode in ("bilinear", "bicubic"):
        grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False, antialias=antialias)
    else:
        raise ValueError(f"unknown resampling mode {mode!r}; use 'bilinear', 'bicubic' or 'scipy'")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)
    return torch.cat([prefix, grid], dim=1)


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10_000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings, ``(gh*gw, dim)`` (as in MoCo v3 / big_vision)."""
    if dim % 4:
        raise ValueError(f"sin-cos embedding width must be a multiple of 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4) / (dim // 4 - 1 or 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def sincos_posemb(grid: tuple[int, int], width: int, num_prefix_tokens: int) -> torch.Tensor:
    """``posemb="sincos2d"``: the table (1, prefix + gh*gw, width), zero in the prefix slots
    (big_vision adds it before the [class] token)."""
    return torch.cat([torch.zeros(num_prefix_tokens, width), sincos_2d(grid, width)])[None]
