"""The model registry: ``create_model(name)`` and ``list_models()``."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import replace_checked
from .hybrid import HybridViT, hybrid_config
from .resnet import ResNetV2, bit_config
from .vit import VisionTransformer, vit_config


@dataclass(frozen=True)
class ModelSpec:
    """A named preset: its config and the class that builds it."""

    name: str
    config: Any
    build: Callable[[Any], nn.Module]
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, config: Any, build: Callable[[Any], nn.Module], description: str = "") -> None:
    """Add a preset to the registry (names are unique)."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelSpec(name, config, build, description)


def list_models(pattern: str = "") -> list[str]:
    """Names of all presets, optionally only those containing ``pattern``."""
    return sorted(n for n in _REGISTRY if pattern in n)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; an unknown name lists the nearest valid ones."""
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.4)
        hint = f"did you mean {', '.join(near)}?" if near else "see `vitlab models`"
        raise ValueError(f"unknown model {name!r}; {hint}")
    return _REGISTRY[name]


def model_config(name: str, **overrides: Any) -> Any:
    """The preset's config with ``overrides`` applied (``None`` values are ignored)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace_checked(get_spec(name).config, **overrides)


def create_model(name: str, *, num_classes: int | None = None, image_size: int | tuple[int, int] | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a fresh, initialised model from a preset: ``create_model("vit_b16", num_classes=10)``."""
    cfg = model_config(name, num_classes=num_classes, image_size=image_size, **overrides)
    return build_model(cfg)


def preset_name(cfg: Any, base: str = "") -> str:
    """The registered preset whose config is exactly ``cfg`` (``vit_mu8_32px`` for Mu/4 with patch 8),
    else ``base`` with the fields that differ from it."""
    for name, spec in _REGISTRY.items():
        if spec.config == cfg:
            return name
    if base in _REGISTRY:
        ref = _REGISTRY[base].config
        diff = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if getattr(cfg, f) != getattr(ref, f, None)}
        return f"{base} ({', '.join(f'{k}={v}' for k, v in diff.items())})" if diff else base
    return base or type(cfg).__name__


def config_type(type_name: str) -> type:
    """The config class called ``type_name`` among the registered presets."""
    for spec in _REGISTRY.values():
        if type(spec.config).__name__ == type_name:
            return type(spec.config)
    raise ValueError(f"unknown config type {type_name!r}")


def build_model(cfg: Any) -> nn.Module:
    """Build a model from a config object (any registered config type)."""
    for spec in _REGISTRY.values():
        if type(spec.config) is type(cfg):
            return spec.build(cfg)
    raise ValueError(f"no model is built from a {type(cfg).__name__}")


# The paper's Table 1 at 224 px with 1000 classes.
for _variant in ("Ti/16", "S/16", "S/32", "B/8", "B/16", "B/32", "L/16", "L/32", "H/14"):
    _size, _patch = _variant.split("/")
    register(f"vit_{_size.lower()}{_patch}", vit_config(_variant), VisionTransformer, f"ViT-{_variant}, paper Table 1")

# Small images (CIFAR, 32 px): patch 4 gives an 8 x 8 grid of 64 patches.
for _size in ("Mu", "Ti", "S"):
    register(
        f"vit_{_size.lower()}4_32px",
        vit_config(f"{_size}/4", image_size=32, num_classes=10),
        VisionTransformer,
        f"ViT-{_size}/4 for 32-px images",
    )
# The `cifar10` recipe's model (issue 8; benchmarks/cifar/notes.md), the architecture of the model
# shipped in the package (`vit_conv_32px.vitlab_cifar10`): a 3-conv stem cuts the 8 x 8 grid.
register("vit_conv_32px", replace_checked(vit_config("Mu/4", image_size=32, num_classes=10), width=192, depth=6,
                                          mlp_dim=384, num_heads=3, pool="gap", class_token=False,
                                          dynamic_image_size=True, conv_stem=(96, 192, 192)),
         VisionTransformer, "the cifar10 recipe's ViT: 3-conv stem to 8 x 8 tokens, width 192, depth 6, GAP")
register("vit_mu8_32px", vit_config("Mu/8", image_size=32, num_classes=10), VisionTransformer,
         "ViT-Mu/8 for 32-px images (a 4 x 4 grid: a quarter of Mu/4's compute)")

# Big Transfer ResNet-v2 baselines (the paper's BiT-L shapes), 1000 classes.
for _depth, _wf in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4)):
    register(f"bit_r{_depth}x{_wf}", bit_config(_depth, _wf), ResNetV2, f"BiT ResNet-v2 R{_depth}x{_wf}")

# BiT for 32-px images at CPU scale (the paper has none; the choices are in the README): a
# 3x3 stride-2 stem without max-pool (stride 2 where ImageNet's stem has 4), so the four R26
# stages see 16, 8, 4 and 2 px maps (stride 1, as CIFAR ResNets, costs 4x the FLOPs); stem
# width 16 with 8 GroupNorm groups keeps R50x1's two channels per group in the narrowest layer.
for _wf in (1, 2):
    register(f"bit_r26x{_wf}_32px", bit_config(26, _wf, image_size=32, num_classes=10, stem_width=16, num_groups=8,
                                               stem_kernel=3, stem_stride=2, stem_pool=False),
             ResNetV2, f"BiT ResNet-v2 R26x{_wf} for 32-px images (3x3/2 stem, width 16)")

# Hybrids (paper Table 1 footnote, official vit_jax configs): ResNet features, then a ViT.
register("r50_vit_b16", hybrid_config("B/1", (3, 4, 9)), HybridViT, "R50+ViT-B/16 hybrid, ResNet stages (3, 4, 9)")
register("r50_vit_l32", hybrid_config("L/1", (3, 4, 6, 3)), HybridViT, "R50+ViT-L/32 hybrid, ResNet stages (3, 4, 6, 3)")
register("r26_vit_s32", hybrid_config("S/1", (2, 2, 2, 2)), HybridViT, "R26+ViT-S/32 hybrid, ResNet stages (2, 2, 2, 2)")
register("r_vit_ti16", hybrid_config("Ti/8", ()), HybridViT, "R+ViT-Ti/16 hybrid: ResNet stem, 8x8 patches")
# 32 px: the stem (stride 4) and one stage of 2 units (R8), 1x1 patches: the 8 x 8 grid of ViT-Mu/4.
register("r8_vit_mu4_32px", hybrid_config("Mu/1", (2,), image_size=32, num_classes=10, resnet_width=16, num_groups=8),
         HybridViT, "R8+ViT-Mu/4 hybrid for 32-px images: stem and one stage, width 16")

__all__ = ["HybridViT", "ModelSpec", "ResNetV2", "VisionTransformer", "bit_config", "build_model", "config_type",
           "create_model", "get_spec", "hybrid_config", "list_models", "model_config", "register", "vit_config"]
