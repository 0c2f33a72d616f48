"""Reading images for inspection: files or folders -> model-ready tensors and displayable RGB.

A small PIL loader (RGB, resize the shorter side, centre crop, normalise). When
``vitlab.data`` provides ``load_image``/``eval_transform`` this module should call those.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..config import as_pair

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``paths``; a folder contributes its images (recursively, sorted)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not inside:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            found.extend(inside)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"image or folder {p} does not exist")
    if not found:
        raise ValueError("no images given; pass image files or folders")
    return found


def load_rgb(path: str | os.PathLike, image_size: int | tuple[int, int]) -> np.ndarray:
    """One image as RGB floats in [0, 1], shorter side resized then centre-cropped: (H, W, 3)."""
    h, w = as_pair(image_size)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    scale = max(h / im.height, w / im.width)
    size = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
    im = im.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - w) // 2, (size[1] - h) // 2
    im = im.crop((left, top, left + w, top + h))
    return np.asarray(im, dtype=np.float32) / 255.0


def normalize(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB in [0, 1], (B, H, W, 3) -> normalised model input (B, 3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def load_images(paths: Sequence[str | os.PathLike], image_size: int | tuple[int, int], mean: Sequence[float],
                std: Sequence[float]) -> tuple[torch.Tensor, np.ndarray]:
    """Images -> (model input (B, 3, H, W), displayable RGB (B, H, W, 3) in [0, 1])."""
    rgb = np.stack([load_rgb(p, image_size) for p in paths])
    return normalize(rgb, mean, std), rgb


def sample_images(folder: str | os.PathLike, num: int, image_size: int | tuple[int, int], mean: Sequence[float],
                  std: Sequence[float]) -> torch.Tensor:
    """Up to ``num`` images spread evenly over a folder's sorted images, as model input (B, 3, H, W)."""
    if num < 1:
        raise ValueError(f"number of images must be at least 1, got {num}")
    paths = find_images([folder])
    paths = paths[:: max(1, len(paths) // num)][:num]
    return load_images(paths, image_size, mean, std)[0]
