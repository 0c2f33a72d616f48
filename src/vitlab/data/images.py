"""Image files and single-image transforms: decode to RGB, resize + centre crop, normalise."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms import v2

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def is_image_file(name: str | os.PathLike) -> bool:
    """True for the extensions read here (JPEG, PNG, WebP, BMP), case-insensitive."""
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``paths``; a folder contributes its images (recursively, sorted)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not inside:
                raise ValueError(f"{p} holds no images (JPEG, PNG, WebP or BMP)")
            found.extend(inside)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"image or folder {p} does not exist")
    if not found:
        raise ValueError("no images given; pass image files or folders")
    return found


def max_pixels() -> int:
    """The largest image decoded: ``$VITLAB_MAX_PIXELS`` (default 40 million, e.g. 8000 x 5000)."""
    value = os.environ.get("VITLAB_MAX_PIXELS", "40000000")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"VITLAB_MAX_PIXELS={value!r} must be a positive whole number of pixels")
    return int(value)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully to RGB with EXIF orientation applied; ValueError if unreadable.

    An image of more than ``max_pixels()`` pixels is refused from its header, before decoding (a
    140 KB PNG can hold 12000 x 12000 pixels, 430 MB decoded); data loaders skip and count it.
    """
    try:
        with Image.open(path) as img:
            if img.width * img.height > (cap := max_pixels()):
                raise ValueError(f"{img.width} x {img.height} pixels is over the cap of {cap:,} "
                                 f"(set VITLAB_MAX_PIXELS to raise it)")
            img.load()  # decode now: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)
            if img.mode in ("P", "PA", "LA", "La") or "transparency" in img.info:
                img = img.convert("RGBA")  # palette / alpha: go through RGBA, then drop alpha
            return img.convert("RGB")
    except FileNotFoundError:
        raise
    except Exception as err:  # any decoder failure (truncated, corrupt, bad EXIF, bomb) is one kind
        raise ValueError(f"cannot read image {path}: {err}") from err


def to_uint8_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def resize_center_crop(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """uint8 (..., C, H, W): resize (antialiased) so the image covers ``size``, crop the centre."""
    h, w = (size, size) if isinstance(size, int) else size
    if x.shape[-2:] != (h, w):
        scale = max(h / x.shape[-2], w / x.shape[-1])
        covered = [max(h, round(x.shape[-2] * scale)), max(w, round(x.shape[-1] * scale))]
        if covered != list(x.shape[-2:]):
            x = v2.functional.resize(x, covered, antialias=True)
        x = v2.functional.center_crop(x, [h, w])
    return x


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (..., 3, H, W) -> float32 ``(x / 255 - mean) / std``."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    return x.float().mul_(scale).sub_(shift)


INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
                  "nearest": v2.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its images: the eval transform of timm's ``pretrained_cfg`` / HF's image processor.

    ``resize="shorter"`` scales the shorter side to ``image_size / crop_pct`` and crops the centre
    (timm); ``"squash"`` resizes both sides to ``image_size`` (HF's ViTImageProcessor, the official
    JAX evaluation). Pixels become ``(x / 255 - mean) / std``.
    """

    image_size: int
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    resize: str = "shorter"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for ok, what in ((self.interpolation in INTERPOLATIONS, f"interpolation {self.interpolation!r}: use "
                          f"{', '.join(INTERPOLATIONS)}"),
                         (self.resize in ("shorter", "squash"), f"resize {self.resize!r}: use shorter or squash"),
                         (0 < self.crop_pct <= 1, f"crop_pct {self.crop_pct}: use a fraction in (0, 1]")):
            if not ok:
                raise ValueError(f"unknown preprocessing {what}")

    def __call__(self, img: Image.Image) -> Tensor:
        """RGB PIL image -> normalised float (3, S, S)."""
        x = to_uint8_tensor(img.convert("RGB"))
        mode, s = INTERPOLATIONS[self.interpolation], self.image_size
        if self.resize == "squash":
            x = v2.functional.resize(x, [s, s], interpolation=mode, antialias=True)
        else:
            x = v2.functional.resize(x, math.floor(s / self.crop_pct), interpolation=mode, antialias=True)
            x = v2.functional.center_crop(x, [s, s])
        return normalize(x, self.mean, self.std)


def eval_transform(image_size: int | tuple[int, int], mean: Sequence[float] = (0.5, 0.5, 0.5),
                   std: Sequence[float] = (0.5, 0.5, 0.5)) -> Callable[[Image.Image], Tensor]:
    """The evaluation preprocessing of one image: RGB PIL -> normalised float (3, S, S)."""
    def transform(img: Image.Image) -> Tensor:
        return normalize(resize_center_crop(to_uint8_tensor(img.convert("RGB")), image_size), mean, std)
    return transform
