"""Typed, frozen configs. Presets are data; derived presets use ``dataclasses.replace``."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

C = TypeVar("C")

Pool = Literal["token", "gap"]
Gelu = Literal["exact", "tanh"]
PosembMode = Literal["bilinear", "bicubic", "scipy"]


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
    pool: Pool = "token"  # "token": the [class] token; "gap": mean of patch tokens
    class_token: bool = True
    representation_size: int | None = None  # pre-logits Linear + tanh
    dropout: float = 0.0  # after the embedding, in the MLP and after attention
    attention_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth, rate rising linearly to this value
    head_dropout: float = 0.0
    gelu: Gelu = "exact"  # the official JAX code uses "tanh"
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    fused_attention: bool = True  # scaled_dot_product_attention, else explicit softmax
    posemb_mode: PosembMode = "bicubic"  # how position embeddings are resampled
    # Input preprocessing the weights expect (kept with the model so outputs match).
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # (0.5, 0.5) maps [0, 1] to [-1, 1]
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        h, w = as_pair(self.image_size)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image_size {h}x{w} is not divisible by patch_size {self.patch_size}; "
                f"use a multiple of {self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.pool not in ("token", "gap"):
            raise ValueError(f"pool must be 'token' or 'gap', got {self.pool!r}")
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' needs class_token=True; use pool='gap' without it")
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
