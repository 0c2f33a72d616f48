"""Big Transfer (BiT) ResNet-v2 (Kolesnikov et al., 2020), the paper's CNN baseline.

Image -> 7x7/2 weight-standardised conv -> 3x3/2 max-pool -> stages of pre-activation
bottleneck units (GroupNorm -> ReLU -> conv, three times, plus the shortcut) -> GroupNorm ->
ReLU -> global average pool -> head. Every convolution standardises its weights.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BiTConfig, HybridConfig, replace_checked
from .layers import check_images, zero_head

# BiT presets: units per stage of R50, R101 and R152 (and R26, for small images).
DEPTHS: dict[int, tuple[int, ...]] = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def bit_config(depth: int, width_factor: int, **overrides) -> BiTConfig:
    """``bit_config(50, 1)`` -> BiT-R50x1; ``overrides`` replace any field."""
    return replace_checked(BiTConfig(layers=DEPTHS[depth], width_factor=width_factor), **overrides)


def standardize_weight(weight: torch.Tensor, eps: float, form: str = "var") -> torch.Tensor:
    """Weight Standardisation: each output filter to zero mean, unit (biased) variance.

    ``form="var"`` divides by sqrt(var + eps) (BiT PyTorch, timm), ``"std"`` by std + eps
    (the official vit_jax hybrid)."""
    var, mean = torch.var_mean(weight, dim=(1, 2, 3), keepdim=True, correction=0)
    return (weight - mean) / (torch.sqrt(var) + eps if form == "std" else torch.sqrt(var + eps))


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow "SAME" padding: output ceil(n / stride), the extra pixel on the bottom/right."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
        total = max((math.ceil(n / stride) - 1) * stride + kernel_size - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class StdConv2d(nn.Conv2d):
    """Conv2d with Weight Standardisation (Qiao et al., 2019); no bias.

    ``same=True`` pads as TensorFlow's "SAME" (the official ViT hybrid), else symmetrically
    by ``kernel_size // 2`` (the official BiT PyTorch code); ``form`` as ``standardize_weight``.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, *, eps: float, same: bool = False,
                 form: str = "var"):
        super().__init__(cin, cout, kernel_size, stride=stride, padding=0 if same else kernel_size // 2, bias=False)
        self.eps = eps
        self.same = same
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, standardize_weight(self.weight, self.eps, self.form), None, self.stride, self.padding)


class PreActBottleneck(nn.Module):
    """ResNet-v2 unit: x + conv3(relu(gn3(conv2(relu(gn2(conv1(relu(gn1(x))))))))).

    The stride sits on the 3x3 conv; a 1x1 projection of the pre-activation replaces the
    shortcut when the shape changes.
    """

    def __init__(self, cin: int, cout: int, stride: int, cfg: BiTConfig):
        super().__init__()
        mid = cout // 4
        g, eps, ws = cfg.num_groups, cfg.gn_eps, cfg.ws_eps
        self.gn1 = nn.GroupNorm(g, cin, eps=eps)
        self.conv1 = StdConv2d(cin, mid, 1, eps=ws)
        self.gn2 = nn.GroupNorm(g, mid, eps=eps)
        self.conv2 = StdConv2d(mid, mid, 3, stride, eps=ws)
        self.gn3 = nn.GroupNorm(g, mid, eps=eps)
        self.conv3 = StdConv2d(mid, cout, 1, eps=ws)
        self.downsample = StdConv2d(cin, cout, 1, stride, eps=ws) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.gn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.gn2(out)))
        out = self.conv3(F.relu(self.gn3(out)))
        return out + shortcut


def make_stages(unit: type[nn.Module], cin: int, layers: tuple[int, ...], widths: tuple[int, ...],
                cfg: BiTConfig | HybridConfig) -> nn.ModuleList:
    """Stages of ``unit(cin, cout, stride, cfg)``: stage 1 keeps the resolution, each later
    stage halves it in its first unit; ``widths`` are the output channels of each stage."""
    stages = []
    for i, (units, cout) in enumerate(zip(layers, widths)):
        stride = 1 if i == 0 else 2
        stages.append(nn.Sequential(*(unit(cin if u == 0 else cout, cout, stride if u == 0 else 1, cfg) for u in range(units))))
        cin = cout
    return nn.ModuleList(stages)


class ResNetV2(nn.Module):
    """BiT ResNet-v2 with the ViT's seams: ``forward_features`` -> ``pool`` -> ``forward_head``."""

    def __init__(self, cfg: BiTConfig):
        super().__init__()
        self.cfg = cfg
        stem = cfg.stem_width * cfg.width_factor
        self.conv_root = StdConv2d(cfg.in_channels, stem, cfg.stem_kernel, cfg.stem_stride, eps=cfg.ws_eps)
        self.stages = make_stages(PreActBottleneck, stem, cfg.layers, cfg.widths, cfg)
        self.norm = nn.GroupNorm(cfg.num_groups, self.num_features, eps=cfg.gn_eps)
        self.head = zero_head(self.num_features, cfg.num_classes)
        if not self.norm.weight.is_meta:  # on the meta device there are only shapes: nothing to initialise
            self.init_weights()

    @property
    def num_features(self) -> int:
        """Width of ``pre_logits`` (the pooled features the head reads)."""
        return self.cfg.widths[-1]

    def init_weights(self) -> None:
        """Convolutions keep PyTorch's default (standardisation removes their scale); GroupNorm
        weight 1, bias 0; a zero head, as the official code for transfer."""
        for m in self.modules():
            if isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> (B, stem width, H/4, W/4): 7x7/2 conv, then 3x3/2 max-pool
        after zero padding (the official code's order; no norm before the first unit).
        Without ``stem_pool`` and at ``stem_stride`` 1 (small images): (B, stem width, H, W)."""
        check_images(x, self.cfg.in_channels)
        x = self.conv_root(x)
        return F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, stride=2) if self.cfg.stem_pool else x

    # --- seams -------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> final feature map after GroupNorm + ReLU (B, F, H/32, W/32 for R50)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return F.relu(self.norm(x))

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, F, h, w) -> (B, F): global average pooling."""
        return fmap.mean(dim=(2, 3))

    def forward_head(self, pooled: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        """(B, F) -> the pooled features themselves if ``pre_logits`` else logits (B, classes)."""
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.pool(self.forward_features(x)))

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named intermediates: stem, stage_0.., encoded, head_input, pre_logits, logits."""
        out: dict[str, torch.Tensor] = {"stem": (x := self.stem(x))}
        for i, stage in enumerate(self.stages):
            out[f"stage_{i}"] = x = stage(x)
        out["encoded"] = x = F.relu(self.norm(x))
        out["head_input"] = x = self.pool(x)
        out["pre_logits"] = x = self.forward_head(x, pre_logits=True)
        out["logits"] = self.head(x)
        return out

    # --- surgery -----------------------------------------------------------------------
    def reset_head(self, num_classes: int, *, keep_pre_logits: bool = True) -> None:
        """A fresh zero-initialised head for ``num_classes`` (0 gives an identity head).

        ``keep_pre_logits`` is the ViT's signature; BiT has no pre-logits layer to drop."""
        ref = next(self.parameters())
        self.head = zero_head(self.num_features, num_classes, like=ref)
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)

    def set_image_size(self, image_size: int | tuple[int, int], mode: str | None = None) -> None:
        """Record a new default resolution; a ResNet has no position embeddings to resample
        (``mode`` is the ViT's signature and unused)."""
        self.cfg = replace_checked(self.cfg, image_size=image_size)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and norms: none."""
        return set()
