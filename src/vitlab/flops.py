"""Exact analytic FLOPs per image (a multiply-add counts 2; matmuls and convolutions only,
the convention of ``torch.utils.flop_counter.FlopCounterMode``)."""
from __future__ import annotations

import math

from torch import nn

from .config import BiTConfig, HybridConfig, ViTConfig, as_pair
from .models.hybrid import HybridViT
from .models.resnet import ResNetV2
from .models.vit import VisionTransformer, stem_strides


def _encoder_flops(cfg: ViTConfig, n: int) -> int:
    """The encoder blocks and the head of a ViT over ``n`` patch tokens."""
    t = n + cfg.num_prefix_tokens
    d, m = cfg.width, cfg.mlp_dim
    block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * m  # qkv, qk+av, proj, mlp
    rep = cfg.representation_size
    head = (2 * d * rep if rep else 0) + 2 * (rep or d) * cfg.num_classes
    if cfg.pool == "seq":  # the score (N x D -> N) and the weighted sum (1 x N @ N x D)
        head += 2 * 2 * n * d
    return cfg.depth * block + head


def vit_flops(cfg: ViTConfig, image_size: int | tuple[int, int] | None = None) -> int:
    """FLOPs of one forward pass of a ViT with ``cfg`` on one image."""
    h, w = as_pair(image_size or cfg.image_size)
    n = (h // cfg.patch_size) * (w // cfg.patch_size)
    if not cfg.conv_stem:
        views = 5 if cfg.shifted_patches else 1  # SPT: the image and its 4 shifts
        return 2 * n * views * cfg.in_channels * cfg.patch_size**2 * cfg.width + _encoder_flops(cfg, n)
    stem, cin = 0, cfg.in_channels
    for stride, cout in zip(stem_strides(cfg), cfg.conv_stem):  # 3x3, padding 1
        flops, h, w = _conv(h, w, cin, cout, 3, stride, same=False)
        stem, cin = stem + flops, cout
    return stem + 2 * n * cin * cfg.width + _encoder_flops(cfg, n)


def _conv(h: int, w: int, cin: int, cout: int, k: int, stride: int, same: bool) -> tuple[int, int, int]:
    """(FLOPs, out h, out w) of a k x k convolution; ``same``: TF "SAME", else padding k // 2."""
    if same:
        h, w = math.ceil(h / stride), math.ceil(w / stride)
    else:
        h, w = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    return 2 * h * w * cin * cout * k * k, h, w


def _resnet_stages(h: int, w: int, cin: int, layers: tuple[int, ...], widths: list[int], same: bool) -> tuple[int, int, int]:
    """(FLOPs, out h, out w) of bottleneck stages (pre- and post-activation units convolve alike)."""
    total = 0
    for i, (units, cout) in enumerate(zip(layers, widths)):
        for u in range(units):
            stride = 2 if i > 0 and u == 0 else 1
            mid = cout // 4
            f1, _, _ = _conv(h, w, cin, mid, 1, 1, same)
            f2, ho, wo = _conv(h, w, mid, mid, 3, stride, same)
            f3, _, _ = _conv(ho, wo, mid, cout, 1, 1, same)
            proj = _conv(h, w, cin, cout, 1, stride, same)[0] if stride != 1 or cin != cout else 0
            total += f1 + f2 + f3 + proj
            h, w, cin = ho, wo, cout
    return total, h, w


def bit_flops(cfg: BiTConfig, image_size: int | tuple[int, int] | None = None) -> int:
    """FLOPs of one forward pass of a BiT ResNet-v2 with ``cfg`` on one image."""
    h, w = as_pair(image_size or cfg.image_size)
    stem = cfg.stem_width * cfg.width_factor
    root, h, w = _conv(h, w, cfg.in_channels, stem, cfg.stem_kernel, cfg.stem_stride, same=False)
    if cfg.stem_pool:
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # zero pad 1, max-pool 3x3/2
    body, _, _ = _resnet_stages(h, w, stem, cfg.layers, list(cfg.widths), same=False)
    return root + body + 2 * cfg.widths[-1] * cfg.num_classes


def hybrid_flops(cfg: HybridConfig, image_size: int | tuple[int, int] | None = None) -> int:
    """FLOPs of one forward pass of a ResNet + ViT hybrid with ``cfg`` on one image."""
    h, w = as_pair(image_size or cfg.image_size)
    c = cfg.resnet_width
    root, h, w = _conv(h, w, cfg.in_channels, c, 7, 2, same=True)
    h, w = math.ceil(h / 2), math.ceil(w / 2)  # max-pool 3x3/2, SAME
    widths = [4 * c * 2**i for i in range(len(cfg.resnet_layers))]
    body, h, w = _resnet_stages(h, w, c, cfg.resnet_layers, widths, same=True)
    p = cfg.patch_size
    n = (h // p) * (w // p)
    return root + body + 2 * n * cfg.feature_channels * p * p * cfg.width + _encoder_flops(cfg, n)


def count_flops(model: nn.Module, image_size: int | tuple[int, int] | None = None) -> int:
    """FLOPs of one forward pass of ``model`` on one image of ``image_size`` (default: the model's)."""
    if isinstance(model, HybridViT):  # before VisionTransformer, its base class
        return hybrid_flops(model.cfg, image_size)
    if isinstance(model, VisionTransformer):
        return vit_flops(model.cfg, image_size)
    if isinstance(model, ResNetV2):
        return bit_flops(model.cfg, image_size)
    raise TypeError(f"count_flops does not know {type(model).__name__}")
