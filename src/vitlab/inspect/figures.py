"""The figures, as PNGs of an exact pixel size (matplotlib's Agg canvas; no pyplot state)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100


def _figure(size: tuple[int, int]) -> Figure:
    """A figure of exactly ``size`` = (width, height) pixels when saved."""
    return Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def upsample(heat: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (rows, cols) map -> (H, W), bilinear, scaled to [0, 1]."""
    t = torch.as_tensor(heat, dtype=torch.float32)[None, None]
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0]
    t = t - t.min()
    return (t / t.max().clamp_min(1e-12)).numpy()


def plot_attention(rgb: np.ndarray, rollout: np.ndarray | torch.Tensor, heads: np.ndarray | torch.Tensor,
                   path: str | os.PathLike, *, title: str = "", size: tuple[int, int] | None = None) -> Path:
    """Image, rollout overlay, and each head's map: rgb (H, W, 3), rollout (r, c), heads (heads, r, c)."""
    num_heads = len(heads)
    cols = max(3, min(6, num_heads))
    rows = 1 + math.ceil(num_heads / cols)
    size = size or (cols * 170, rows * 180 + 30)
    fig = _figure(size)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    hw = rgb.shape[:2]
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].imshow(rgb)
    axes[0, 1].imshow(upsample(rollout, hw), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[0, 1].set_title("attention rollout", fontsize=9)
    axes[0, 2].imshow(upsample(rollout, hw), cmap="inferno", vmin=0, vmax=1)
    axes[0, 2].set_title("rollout map", fontsize=9)
    for h in range(num_heads):
        ax = axes[1 + h // cols, h % cols]
        ax.imshow(rgb)
        ax.imshow(upsample(heads[h], hw), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(f"last layer, head {h}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_posemb_similarity(sim: torch.Tensor | np.ndarray, path: str | os.PathLike, *,
                           size: tuple[int, int] | None = None) -> Path:
    """Grid of grids (rows, cols, rows, cols): tile (i, j) is position (i, j)'s similarity to all others.

    All tiles share one colour scale spanning the data's range, with a colour bar.
    """
    sim = np.asarray(sim, dtype=np.float32)
    r, c = sim.shape[:2]
    mosaic = np.full((r * (r + 1) - 1, c * (c + 1) - 1), np.nan, dtype=np.float32)
    for i in range(r):
        for j in range(c):
            mosaic[i * (r + 1) : i * (r + 1) + r, j * (c + 1) : j * (c + 1) + c] = sim[i, j]
    cell_px = 3  # screen pixels per similarity value in the default size
    size = size or (min(2000, max(640, round(mosaic.shape[1] * cell_px / 0.72))),
                    min(1800, max(560, round(mosaic.shape[0] * cell_px / 0.8))))
    fig = _figure(size)
    ax = fig.add_axes((0.1, 0.1, 0.72, 0.8))
    cmap = colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(mosaic, cmap=cmap, vmin=float(sim.min()), vmax=float(sim.max()), interpolation="nearest")
    ax.set_xticks([j * (c + 1) + (c - 1) / 2 for j in range(c)], [str(j + 1) for j in range(c)], fontsize=7)
    ax.set_yticks([i * (r + 1) + (r - 1) / 2 for i in range(r)], [str(i + 1) for i in range(r)], fontsize=7)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title("Position embedding similarity")
    cax = fig.add_axes((0.86, 0.1, 0.03, 0.8))
    fig.colorbar(im, cax=cax, label="cosine similarity")
    return _save(fig, path)


def plot_attention_distance(dist: torch.Tensor | np.ndarray, path: str | os.PathLike, *, uniform: float | None = None,
                            num_images: int | None = None, size: tuple[int, int] | None = None) -> Path:
    """Scatter of mean attention distance (layers, heads) against depth; one point per head."""
    dist = np.asarray(dist, dtype=np.float32)
    layers, heads = dist.shape
    size = size or (560, 420)
    fig = _figure(size)
    ax = fig.add_axes((0.13, 0.13, 0.82, 0.77))
    cmap = colormaps["tab20"]
    for h in range(heads):
        ax.scatter(np.arange(1, layers + 1), dist[:, h], s=14, color=cmap(h % 20), label=f"head {h}")
    if uniform is not None:
        ax.axhline(uniform, color="grey", linestyle="--", linewidth=1, label="uniform attention")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xlim(0.5, layers + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0, top=max(float(np.nanmax(dist)), uniform or 0.0) * 1.1 + 1e-6)
    ax.set_title("Mean attention distance" + (f" ({num_images} images)" if num_images else ""))
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    return _save(fig, path)


def plot_embedding_filters(filters: torch.Tensor | np.ndarray, path: str | os.PathLike, *, cols: int = 7,
                           size: tuple[int, int] | None = None) -> Path:
    """Principal components (k, C, P, P) as RGB patches (grey if C != 3), each scaled to [0, 1]."""
    filters = np.asarray(filters, dtype=np.float32)
    k = len(filters)
    cols = min(cols, k)
    rows = math.ceil(k / cols)
    size = size or (cols * 80, rows * 80 + 40)
    fig = _figure(size)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for n, f in enumerate(filters):
        f = f - f.min()
        f = f / max(float(f.max()), 1e-12)
        img = f.transpose(1, 2, 0) if f.shape[0] == 3 else f.mean(axis=0)
        axes[n // cols, n % cols].imshow(img, cmap=None if f.shape[0] == 3 else "gray", interpolation="nearest")
    fig.suptitle("RGB embedding filters (first principal components)", fontsize=10)
    return _save(fig, path)

