"""Training augmentation.

Batched ops on uint8 images (B, 3, H, W), used for in-memory sets and (one image at a time)
for streamed folders, and batch-level Mixup / CutMix producing soft targets. All randomness
comes from the generator passed in, so a batch is a function of its seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import v2

from .images import resize_center_crop

RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the inception-style crop


@dataclass(frozen=True)
class TrainAugment:
    """What the training transform does; built from a DataConfig by the Loader."""

    image_size: int
    crop: str  # "pad", "rrc" or "none" ("auto" already resolved)
    crop_padding: int
    rrc_scale: tuple[float, float]
    hflip: bool
    randaugment_n: int
    randaugment_m: int

    def batch(self, x: Tensor, g: torch.Generator) -> Tensor:
        """uint8 (B, 3, h, w) -> uint8 (B, 3, S, S), each image with its own random draws."""
        if self.crop == "rrc":
            x = random_resized_crop(x, self.image_size, self.rrc_scale, g)
        else:
            x = resize_center_crop(x, self.image_size)
            if self.crop == "pad":
                x = pad_crop(x, self.crop_padding, g)
        return self._flip_randaugment(x, g)

    def one(self, x: Tensor, g: torch.Generator) -> Tensor:
        """uint8 (3, h, w) -> uint8 (3, S, S): ``batch`` for one (large) image, cropped before resizing."""
        if self.crop != "rrc":
            return self.batch(x[None], g)[0]
        x0, y0, cw, ch = (int(v) for v in rrc_boxes(1, *x.shape[-2:], self.rrc_scale, g)[0])
        x = v2.functional.resized_crop(x, y0, x0, ch, cw, [self.image_size] * 2, antialias=True)
        return self._flip_randaugment(x[None], g)[0]

    def _flip_randaugment(self, x: Tensor, g: torch.Generator) -> Tensor:
        if self.hflip:
            x = random_hflip(x, g)
        if self.randaugment_n:
            x = randaugment(x, self.randaugment_n, self.randaugment_m, g)
        return x


def pad_crop(x: Tensor, padding: int, g: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` then crop back to (H, W) at a random offset per image."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)  # (B, C, H + 2p, W + 2p)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=g)
    rows = (dy + torch.arange(h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * padding)
    cols = (dx + torch.arange(w)).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_hflip(x: Tensor, g: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def rrc_boxes(b: int, h: int, w: int, scale: tuple[float, float], g: torch.Generator) -> Tensor:
    """Inception-style crop boxes (x0, y0, width, height), float (B, 4), for (H, W) images.

    Area is uniform in ``scale`` of the image, log aspect ratio uniform in 3/4..4/3; the first
    of 10 draws that fits is used, else the centre square.
    """
    tries = 10
    area = h * w * torch.empty(b, tries).uniform_(scale[0], scale[1], generator=g)
    ratio = torch.exp(torch.empty(b, tries).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=g))
    cw = torch.sqrt(area * ratio).round()
    ch = torch.sqrt(area / ratio).round()
    ok = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    found = ok.any(1)
    pick = ok.float().argmax(1, keepdim=True)  # the first draw that fits
    side = float(min(h, w))
    cw = torch.where(found, cw.gather(1, pick)[:, 0], side)
    ch = torch.where(found, ch.gather(1, pick)[:, 0], side)
    u = torch.rand(b, 2, generator=g)
    x0 = torch.where(found, (u[:, 0] * (w - cw + 1)).floor(), float((w - min(h, w)) // 2))
    y0 = torch.where(found, (u[:, 1] * (h - ch + 1)).floor(), float((h - min(h, w)) // 2))
    return torch.stack([x0, y0, cw, ch], 1)


def random_resized_crop(x: Tensor, size: int, scale: tuple[float, float],
                        g: torch.Generator) -> Tensor:
    """A random inception-style crop of each image (see ``rrc_boxes``) resized to ``size``."""
    b, _, h, w = x.shape
    x0, y0, cw, ch = rrc_boxes(b, h, w, scale, g).unbind(1)
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
    # Bilinear; sampling_ratio=0 averages ceil(crop / size) samples per output pixel per axis,
    # so shrinking is antialiased and a crop of exactly ``size`` pixels is copied unchanged.
    out = roi_align(x.float(), boxes, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


# RandAugment's 14 operations (Cubuk et al., 2020) as in torchvision: name -> the value at
# magnitude M of 31 bins, and whether its sign is random.
def _ra_table(m: int, h: int, w: int) -> dict[str, tuple[float, bool]]:
    t = m / 30.0
    return {
        "Identity": (0.0, False), "ShearX": (0.3 * t, True), "ShearY": (0.3 * t, True),
        "TranslateX": (150.0 / 331.0 * w * t, True), "TranslateY": (150.0 / 331.0 * h * t, True),
        "Rotate": (30.0 * t, True), "Brightness": (0.9 * t, True), "Color": (0.9 * t, True),
        "Contrast": (0.9 * t, True), "Sharpness": (0.9 * t, True),
        "Posterize": (float(8 - int(round(m / 7.5))), False), "Solarize": (1.0 - t, False),
        "AutoContrast": (0.0, False), "Equalize": (0.0, False),
    }


def _ra_apply(x: Tensor, name: str, v: float) -> Tensor:
    """One RandAugment op with value ``v`` on uint8 (k, 3, H, W)."""
    F2, near = v2.functional, v2.InterpolationMode.NEAREST
    if name == "ShearX":
        return F2.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(v)), 0.0],
                         interpolation=near, center=[0, 0])
    if name == "ShearY":
        return F2.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(v))],
                         interpolation=near, center=[0, 0])
    if name == "TranslateX":
        return F2.affine(x, angle=0.0, translate=[int(v), 0], scale=1.0, shear=[0.0, 0.0], interpolation=near)
    if name == "TranslateY":
        return F2.affine(x, angle=0.0, translate=[0, int(v)], scale=1.0, shear=[0.0, 0.0], interpolation=near)
    if name == "Rotate":
        return F2.rotate(x, v, interpolation=near)
    if name == "Brightness":
        return F2.adjust_brightness(x, 1.0 + v)
    if name == "Color":
        return F2.adjust_saturation(x, 1.0 + v)
    if name == "Contrast":
        return F2.adjust_contrast(x, 1.0 + v)
    if name == "Sharpness":
        return F2.adjust_sharpness(x, 1.0 + v)
    if name == "Posterize":
        return F2.posterize(x, int(v))
    if name == "Solarize":
        return F2.solarize(x, 255.0 * v)
    if name == "AutoContrast":
        return F2.autocontrast(x)
    if name == "Equalize":
        return F2.equalize(x)
    return x


def randaugment(x: Tensor, num_ops: int, magnitude: int, g: torch.Generator) -> Tensor:
    """RandAugment(N, M) with an op (and sign) drawn per image, applied per group of equal draws."""
    table = _ra_table(magnitude, *x.shape[-2:])
    names = list(table)
    b = x.shape[0]
    for _ in range(num_ops):
        op = torch.randint(len(names), (b,), generator=g)
        negative = torch.rand(b, generator=g) < 0.5
        out = x.clone()
        for k in op.unique().tolist():
            value, signed = table[names[k]]
            for sign in ((1.0, -1.0) if signed else (1.0,)):
                sel = (op == k) & (negative == (sign < 0)) if signed else op == k
                if sel.any():
                    out[sel] = _ra_apply(x[sel], names[k], sign * value)
        x = out
    return x


def mix(x: Tensor, y: Tensor, num_classes: int, mixup: float, cutmix: float,
        rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Mixup or CutMix (half the batches each when both are on) of x with the reversed batch.

    x: float (B, C, H, W); y: int64 (B,) -> (mixed x, soft targets float (B, num_classes)).
    """
    target = F.one_hot(y, num_classes).float()
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    other = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
    else:
        x = torch.lerp(other, x, lam)  # lam * x + (1 - lam) * other
    return x, target * lam + target.flip(0) * (1.0 - lam)
