"""The hybrid ResNet + ViT (paper section 3.1, "Hybrid Architecture").

Image -> ResNet stem (and stages) -> feature map -> P x P patches of it (1 x 1 for R50)
projected to D -> the ViT of ``vit.py`` unchanged: [class] token, position embeddings,
encoder blocks, head. The ResNet is the one of the official ``vit_jax`` hybrid:
post-activation bottlenecks with GroupNorm and weight-standardised convolutions, TF "SAME"
padding, stage 1 at stride 1 and each later stage at stride 2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HybridConfig, replace_checked
from .resnet import StdConv2d, make_stages, pad_same
from .layers import check_images
from .vit import VARIANTS, VisionTransformer


def hybrid_config(variant: str, resnet_layers: tuple[int, ...], **overrides) -> HybridConfig:
    """``hybrid_config("B/1", (3, 4, 9))`` -> R50+ViT-B/16; the patch size is on the feature map."""
    size, patch = variant.split("/")
    base = HybridConfig(**VARIANTS[size], patch_size=int(patch), resnet_layers=resnet_layers)
    return replace_checked(base, **overrides)


class Bottleneck(nn.Module):
    """Post-activation unit: relu(shortcut + gn3(conv3(relu(gn2(conv2(relu(gn1(conv1(x)))))))))."""

    def __init__(self, cin: int, cout: int, stride: int, cfg: HybridConfig):
        super().__init__()
        mid = cout // 4
        g, eps, ws = cfg.num_groups, cfg.gn_eps, cfg.ws_eps
        self.conv1 = StdConv2d(cin, mid, 1, eps=ws, same=True, form=cfg.ws_form)
        self.gn1 = nn.GroupNorm(g, mid, eps=eps)
        self.conv2 = StdConv2d(mid, mid, 3, stride, eps=ws, same=True, form=cfg.ws_form)
        self.gn2 = nn.GroupNorm(g, mid, eps=eps)
        self.conv3 = StdConv2d(mid, cout, 1, eps=ws, same=True, form=cfg.ws_form)
        self.gn3 = nn.GroupNorm(g, cout, eps=eps)
        self.conv_proj = self.gn_proj = None
        if stride != 1 or cin != cout:
            self.conv_proj = StdConv2d(cin, cout, 1, stride, eps=ws, same=True, form=cfg.ws_form)
            self.gn_proj = nn.GroupNorm(g, cout, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(shortcut + y)


class ResNetEmbed(nn.Module):
    """ResNet stem and stages, then P x P patches of the feature map projected to D tokens."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.in_channels = cfg.in_channels
        self.stride = cfg.feature_stride * cfg.patch_size
        w = cfg.resnet_width
        self.conv_root = StdConv2d(cfg.in_channels, w, 7, 2, eps=cfg.ws_eps, same=True, form=cfg.ws_form)
        self.gn_root = nn.GroupNorm(cfg.num_groups, w, eps=cfg.gn_eps)
        widths = tuple(4 * w * 2**i for i in range(len(cfg.resnet_layers)))
        self.stages = make_stages(Bottleneck, w, cfg.resnet_layers, widths, cfg)
        self.proj = nn.Conv2d(cfg.feature_channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> ResNet features (B, F, H/s, W/s), s = ``feature_stride``."""
        check_images(x, self.in_channels, self.stride, f"{self.stride} (ResNet stride x patch size)")
        x = F.relu(self.gn_root(self.conv_root(x)))
        x = F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, stride=2)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.feature_map(x)).flatten(2).transpose(1, 2)  # (B, F, h, w) -> (B, N, D)


class HybridViT(VisionTransformer):
    """A ViT whose patch embedding is a ResNet: every seam of ``VisionTransformer`` holds."""

    cfg: HybridConfig

    @staticmethod
    def _make_patch_embed(cfg: HybridConfig) -> nn.Module:
        return ResNetEmbed(cfg)

    def init_weights(self) -> None:
        """The ViT's initialisation; in the ResNet, GroupNorm 1 and 0 except a zero scale on
        each unit's last GroupNorm (as the official code), convolutions PyTorch's default."""
        super().init_weights()
        for m in self.patch_embed.modules():
            if isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.gn3.weight)
