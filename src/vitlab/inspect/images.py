"""Images for inspection: files, folders or a data set -> model input and displayable RGB.

Decoding and preprocessing are ``vitlab.data``'s (the model's evaluation transform).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..data import DataConfig, build_data, load_image
from ..data.images import find_images, normalize, resize_center_crop, to_uint8_tensor


def _prepare(images: list[torch.Tensor], image_size: int | tuple[int, int], mean: Sequence[float],
             std: Sequence[float]) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 (3, H, W) images -> (model input (B, 3, h, w), displayable RGB (B, h, w, 3) in [0, 1])."""
    x = torch.stack([resize_center_crop(im, image_size) for im in images])
    rgb = x.permute(0, 2, 3, 1).float().div(255.0).numpy()
    return normalize(x, mean, std), rgb


def load_images(paths: Sequence[str | os.PathLike], image_size: int | tuple[int, int], mean: Sequence[float],
                std: Sequence[float]) -> tuple[torch.Tensor, np.ndarray]:
    """Image files -> (model input (B, 3, H, W), displayable RGB (B, H, W, 3) in [0, 1])."""
    return _prepare([to_uint8_tensor(load_image(p)) for p in paths], image_size, mean, std)


def sample_images(data: str | os.PathLike, num: int, image_size: int | tuple[int, int], mean: Sequence[float],
                  std: Sequence[float]) -> torch.Tensor:
    """Up to ``num`` images spread evenly over a data set (any ``--data`` vitlab reads) as model input."""
    if num < 1:
        raise ValueError(f"number of images must be at least 1, got {num}")
    built = build_data(DataConfig(path=str(data)), log=lambda *_: None)
    dataset = built.test or built.val or built.train
    picks = range(0, len(dataset), max(1, len(dataset) // num))[:num]
    items = [dataset[i][0] for i in picks]
    items = [to_uint8_tensor(im) if isinstance(im, Image.Image) else im for im in items]
    return _prepare(items, image_size, mean, std)[0]
