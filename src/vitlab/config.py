"""Typed, frozen configs. Presets are data; derived presets use ``dataclasses.replace``."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

C = TypeVar("C")

Pool = Literal["token", "gap", "map", "seq"]
Posemb = Literal["learn", "sincos2d"]
Gelu = Literal["exact", "tanh"]
PosembMode = Literal["bilinear", "bicubic", "scipy"]
WsForm = Literal["var", "std"]


def check_numbers(cfg: Any, *, signed: tuple[str, ...] = ()) -> None:
    """Every float field of a config (and every float in a tuple field) is finite, and >= 0 unless
    named in ``signed``: ``--lr inf`` or ``--weight-decay -1`` fail here, naming the field."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not (math.isfinite(v) and (v >= 0 or f.name in signed)):
                raise ValueError(f"invalid {type(cfg).__name__}: {f.name} = {value}; it must be a finite number"
                                 + ("" if f.name in signed else " >= 0"))


def as_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``224`` -> ``(224, 224)``; ``(h, w)`` unchanged."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """The Vision Transformer (paper section 3.1); defaults follow the official code."""

    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    width: int = 768  # D, the token width
    depth: int = 12  # number of encoder blocks
    mlp_dim: int = 3072
    num_heads: int = 12
    pool: Pool = "token"  # "token": the [class] token; "gap": mean of patch tokens; "map": attention pooling
    # of the patch tokens by a learned probe (big_vision's MAPHead, timm's attn_pool); "seq": CCT's sequence
    # pooling (Hassani et al. 2021), patch tokens weighted by a softmax over a learned linear score
    class_token: bool = True
    representation_size: int | None = None  # pre-logits Linear + tanh
    dropout: float = 0.0  # after the embedding, in the MLP and after attention
    attention_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth, rate rising linearly to this value
    patch_dropout: float = 0.0  # training only: drop this fraction of patch tokens per image (PatchDropout)
    # A convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better"),
    # a small-image form of the paper's hybrid (tokens from a CNN feature map): 3x3 convolutions
    # (BatchNorm, ReLU) with these output channels, then a 1x1 projection to D. The first log2(P)
    # have stride 2 and cut the P x P patches; any after them have stride 1 (at the token grid).
    conv_stem: tuple[int, ...] = ()  # conv stem channels (>= log2(patch_size) of them); (): linear patches
    # Small-data options (Lee et al. 2021, "Vision Transformer for Small-Size Datasets"): shifted patch
    # tokenisation (the image and its 4 diagonal shifts by P/2 cut into patches, LayerNorm, linear) and
    # locality self-attention (a learned temperature per head, no attention of a token to itself).
    shifted_patches: bool = False
    locality_attention: bool = False
    layer_scale: float = 0.0  # per-channel scales on each residual branch, initialised to this (CaiT; timm's
    # init_values); 0: none
    head_dropout: float = 0.0
    gelu: Gelu = "exact"  # the official JAX code uses "tanh"
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    fused_attention: bool = True  # the fastest kernel (SDPA or batched matmuls), else explicit softmax
    posemb: Posemb = "learn"  # "sincos2d": a fixed 2-D sin-cos table (big_vision), not a parameter
    posemb_mode: PosembMode = "bicubic"  # how learned position embeddings are resampled
    dynamic_image_size: bool = False  # any image size: position embeddings resampled in forward
    # Input preprocessing the weights expect (kept with the model so outputs match).
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # (0.5, 0.5) maps [0, 1] to [-1, 1]
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        check_numbers(self, signed=("mean",))
        h, w = as_pair(self.image_size)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image_size {h}x{w} is not divisible by patch_size {self.patch_size}; "
                f"use a multiple of {self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.pool not in ("token", "gap", "map", "seq"):
            raise ValueError(f"pool must be 'token', 'gap', 'map' or 'seq', got {self.pool!r}")
        if self.shifted_patches and self.conv_stem:
            raise ValueError(f"shifted_patches and conv_stem={self.conv_stem} both cut the patches; choose one")
        if self.posemb not in ("learn", "sincos2d"):
            raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
        if self.posemb == "sincos2d" and self.width % 4:
            raise ValueError(f"posemb='sincos2d' needs a width divisible by 4, got {self.width}")
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' needs class_token=True; use pool='gap' without it")
        if self.conv_stem and not (self.patch_size & (self.patch_size - 1) == 0
                                   and 2 ** len(self.conv_stem) >= self.patch_size):
            raise ValueError(f"conv_stem {self.conv_stem} cuts patches with stride-2 convolutions: patch_size "
                             f"must be a power of two at most {2 ** len(self.conv_stem)}, got {self.patch_size}")
        if self.gelu not in ("exact", "tanh"):
            raise ValueError(f"gelu must be 'exact' or 'tanh', got {self.gelu!r}")

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = as_pair(self.image_size)
        return (h // self.patch_size, w // self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token)


@dataclass(frozen=True, kw_only=True)
class BiTConfig:
    """Big Transfer ResNet-v2 (Kolesnikov et al., 2020): pre-activation bottlenecks, GroupNorm
    and weight-standardised convolutions; defaults follow the official BiT PyTorch code (R50x1)."""

    image_size: int | tuple[int, int] = 224  # the default resolution (any size runs)
    in_channels: int = 3
    num_classes: int = 1000  # BiT-S heads; the BiT-M (ImageNet-21k) files have 21843
    layers: tuple[int, ...] = (3, 4, 6, 3)  # bottleneck units per stage: R50; R101 (3, 4, 23, 3); R152 (3, 8, 36, 3)
    width_factor: int = 1  # the "x1", "x3", "x4": every width times this
    stem_width: int = 64  # before width_factor; stage i outputs 4 * stem_width * 2**i channels
    stem_kernel: int = 7  # the root convolution: 7x7 stride 2, then a 3x3/2 max-pool (stride 4 in all) ...
    stem_stride: int = 2
    stem_pool: bool = True  # ... small images use e.g. 3x3 stride 1 and no pool (stride 1), as CIFAR ResNets
    num_groups: int = 32  # GroupNorm groups
    gn_eps: float = 1e-5
    ws_eps: float = 1e-10  # weight standardisation: (w - mean) / sqrt(var + ws_eps), as the official code
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # BiT also maps [0, 1] to [-1, 1]
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        check_numbers(self, signed=("mean",))
        if not self.layers or min(self.layers) < 1:
            raise ValueError(f"layers must be a non-empty tuple of positive unit counts, got {self.layers}")
        if self.stem_kernel < 1 or self.stem_stride < 1:
            raise ValueError(f"stem_kernel and stem_stride must be >= 1, got {self.stem_kernel} and {self.stem_stride}")
        if (self.stem_width * self.width_factor) % self.num_groups:
            raise ValueError(
                f"stem_width * width_factor = {self.stem_width * self.width_factor} is not divisible by "
                f"num_groups {self.num_groups}; use a multiple of {self.num_groups}"
            )

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of each stage (the bottleneck is a quarter of it)."""
        return tuple(4 * self.stem_width * self.width_factor * 2**i for i in range(len(self.layers)))


@dataclass(frozen=True, kw_only=True)
class HybridConfig(ViTConfig):
    """ResNet + ViT hybrid (paper section 3.1): a ResNet stem and stages make the feature map
    whose ``patch_size`` x ``patch_size`` patches (1 x 1 for R50) are the tokens. The ResNet is
    the official ``vit_jax`` one: post-activation bottlenecks, GroupNorm, weight-standardised
    convolutions, TF "SAME" padding; stage 1 has stride 1, each later stage 2."""

    patch_size: int = 1  # on the feature map, not the image
    resnet_layers: tuple[int, ...] = (3, 4, 9)  # () is the stem alone (R+ViT-Ti/16)
    resnet_width: int = 64  # stem width; stage i outputs 4 * resnet_width * 2**i channels
    num_groups: int = 32
    gn_eps: float = 1e-6  # flax GroupNorm's default, as the official code
    # The official code divides by (std + 1e-5) (ws_form="std", ws_eps=1e-5, what an imported
    # official .npz gets); timm's port of its weights uses sqrt(var + 1e-8) (the default).
    ws_eps: float = 1e-8
    ws_form: WsForm = "var"  # "var": (w - mean) / sqrt(var + ws_eps); "std": (w - mean) / (std + ws_eps)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resnet_layers and min(self.resnet_layers) < 1:
            raise ValueError(f"resnet_layers must hold positive unit counts (or be () for the stem alone), got {self.resnet_layers}")
        h, w = as_pair(self.image_size)
        s = self.feature_stride * self.patch_size
        if h % s or w % s:
            raise ValueError(f"image_size {h}x{w} is not divisible by {s} (ResNet stride x patch_size); use a multiple of {s}")
        if self.ws_form not in ("var", "std"):
            raise ValueError(f"ws_form must be 'var' or 'std', got {self.ws_form!r}")
        if self.resnet_width % self.num_groups:
            raise ValueError(f"resnet_width {self.resnet_width} is not divisible by num_groups {self.num_groups}")

    @property
    def feature_stride(self) -> int:
        """Input pixels per feature-map cell: 4 for the stem, then x2 for each stage after the first."""
        return 4 * 2 ** max(len(self.resnet_layers) - 1, 0)

    @property
    def feature_channels(self) -> int:
        """Channels of the ResNet feature map that is cut into patches."""
        n = len(self.resnet_layers)
        return 4 * self.resnet_width * 2 ** (n - 1) if n else self.resnet_width

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = as_pair(self.image_size)
        s = self.feature_stride * self.patch_size
        return (h // s, w // s)


def replace_checked(cfg: C, **overrides: Any) -> C:
    """``dataclasses.replace`` that names an unknown field and the nearest valid ones."""
    names = [f.name for f in dataclasses.fields(cfg)]  # type: ignore[arg-type]
    for key in overrides:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else f"; valid: {', '.join(names)}"
            raise ValueError(f"unknown {type(cfg).__name__} field {key!r}{hint}")
    return dataclasses.replace(cfg, **overrides)  # type: ignore[type-var]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config from ``to_dict`` output; an unknown key is an error."""
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid: {sorted(names)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**fixed)
