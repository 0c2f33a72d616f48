"""timm state dicts: ``VisionTransformer`` (``timm/models/vision_transformer.py``), its ResNet
hybrids (``vision_transformer_hybrid.py``: ``vit_base_r50_s16_224``, ``vit_small_r26_s32_224``,
``vit_tiny_r_s16_p8_224``, ...) and the BiT ``ResNetV2`` (``resnetv2.py``: ``resnetv2_50x1_bit``, ...).

vitlab's ViT module names follow timm's (``attn_pool.*`` too: timm's ``global_pool="map"``), so
the table is a rename only for the old representation layer (``pre_logits.fc``, timm < 0.6)
and, in ResNets, for timm's ``stem.``/``blocks.``/``norm{i}``/``downsample.{conv,norm}`` names
(``NAMES``); BiT's head is a 1x1 conv in timm. timm's numerics: exact GELU, LayerNorm eps
1e-6, GroupNorm eps 1e-5, weight standardisation sqrt(var + 1e-8). A state dict records
neither the number of heads nor the input normalisation: the heads come from the paper's
table by width (else head_dim 64), the normalisation defaults to mean = std = 0.5 (the AugReg
and BiT weights); override either.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..config import BiTConfig, HybridConfig, ViTConfig
from ..models import build_model
from ..models.vit import VARIANTS
from .keymap import Entry, one, units_per_stage

RENAMES = {"pre_logits.0.weight": "pre_logits.fc.weight", "pre_logits.0.bias": "pre_logits.fc.bias"}
# vitlab key prefix (a regex) -> timm key prefix, per model family; the first match renames.
_UNIT = r"stages\.(\d+)\.(\d+)\."
_TIMM_UNIT = r"stages\.(\d+)\.blocks\.(\d+)\."
NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "bit": (
        (r"conv_root\.", "stem.conv."),
        (_UNIT + r"gn(\d)\.", r"stages.\1.blocks.\2.norm\3."),
        (_UNIT + r"downsample\.", r"stages.\1.blocks.\2.downsample.conv."),
        (_UNIT, r"stages.\1.blocks.\2."),
        (r"head\.", "head.fc."),
    ),
    "hybrid": (  # timm's stem-only backbone (no ResNet stages) drops "stem."
        (r"patch_embed\.conv_root\.", "patch_embed.backbone.stem.conv."),
        (r"patch_embed\.gn_root\.", "patch_embed.backbone.stem.norm."),
        (r"patch_embed\." + _UNIT + r"gn(\d)\.", r"patch_embed.backbone.stages.\1.blocks.\2.norm\3."),
        (r"patch_embed\." + _UNIT + r"conv_proj\.", r"patch_embed.backbone.stages.\1.blocks.\2.downsample.conv."),
        (r"patch_embed\." + _UNIT + r"gn_proj\.", r"patch_embed.backbone.stages.\1.blocks.\2.downsample.norm."),
        (r"patch_embed\." + _UNIT, r"patch_embed.backbone.stages.\1.blocks.\2."),
    ),
}


def vitlab_keys(cfg: ViTConfig | BiTConfig) -> list[str]:
    """The state-dict keys of a vitlab model with this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        return list(build_model(cfg).state_dict())


def timm_key(key: str, cfg: ViTConfig | BiTConfig) -> str:
    """The timm name of vitlab key ``key``."""
    family = "bit" if isinstance(cfg, BiTConfig) else "hybrid" if isinstance(cfg, HybridConfig) else ""
    for pattern, repl in NAMES.get(family, ()):
        if m := re.match(pattern, key):
            name = m.expand(repl) + key[m.end():]
            if family == "hybrid" and not cfg.resnet_layers:
                name = name.replace("backbone.stem.", "backbone.")
            return name
    return RENAMES.get(key, key)


def _conv1x1_in(t: torch.Tensor) -> torch.Tensor:
    """timm's BiT head, a 1x1 conv weight (out, in, 1, 1) -> Linear weight (out, in)."""
    return t.flatten(1)


def _conv1x1_out(w: torch.Tensor) -> torch.Tensor:
    """Linear weight (out, in) -> 1x1 conv weight (out, in, 1, 1)."""
    return w[:, :, None, None]


def key_map(cfg: ViTConfig | BiTConfig) -> list[Entry]:
    """The table vitlab key <-> timm key (tensors as they are, but BiT's 1x1-conv head)."""
    bit_head = isinstance(cfg, BiTConfig) and cfg.num_classes
    return [one(key, timm_key(key, cfg), _conv1x1_in, _conv1x1_out) if bit_head and key == "head.weight"
            else one(key, timm_key(key, cfg)) for key in vitlab_keys(cfg)]


def family(tensors: dict[str, torch.Tensor]) -> str:
    """"bit" (ResNetV2), "hybrid" (ViT with a ResNet backbone) or "vit"."""
    if "stem.conv.weight" in tensors:
        return "bit"
    return "hybrid" if any(k.startswith("patch_embed.backbone.") for k in tensors) else "vit"


def bit_config_fields(tensors: dict[str, torch.Tensor], source: str, notes: list[str]) -> dict[str, Any]:
    """The ``BiTConfig`` fields of a timm ``ResNetV2`` (BiT) state dict, plus timm's numerics."""
    stem = tensors["stem.conv.weight"]  # (stem width, C, 7, 7)
    width = stem.shape[0]
    factor = width // 64 if width % 64 == 0 else 1
    head = tensors.get("head.fc.bias")
    notes.append("timm state dicts do not record the input normalisation: assumed mean = std = 0.5 (BiT's)")
    return dict(in_channels=stem.shape[1], layers=units_per_stage(tensors, _TIMM_UNIT, source), width_factor=factor,
                stem_width=width // factor, num_classes=head.shape[0] if head is not None else 0,
                gn_eps=1e-5, ws_eps=1e-8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _need(tensors: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{source} is not a timm VisionTransformer state dict: it has no {key!r} "
                         f"(keys: {', '.join(sorted(tensors)[:6])}, ...); pick the format with --from")
    return tensors[key]


def config_fields(tensors: dict[str, torch.Tensor], source: str, notes: list[str],
                  num_heads: int | None = None) -> tuple[type, dict[str, Any]]:
    """The config class (``ViTConfig``, ``HybridConfig`` or ``BiTConfig``) and the fields the
    tensors imply, plus timm's numerics."""
    kind = family(tensors)
    if kind == "bit":
        return BiTConfig, bit_config_fields(tensors, source, notes)
    weight = _need(tensors, "patch_embed.proj.weight", source)  # (D, C, P, P)
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{source}: patch_embed.proj.weight has shape {tuple(weight.shape)}, expected (D, C, P, P)")
    width, channels, patch, _ = weight.shape
    depth = 1 + max((int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    mlp_dim = _need(tensors, "blocks.0.mlp.fc1.weight", source).shape[0]
    if num_heads is None:
        known = [v["num_heads"] for v in VARIANTS.values() if (v["width"], v["mlp_dim"]) == (width, mlp_dim)]
        num_heads = known[0] if known else width // 64 if width % 64 == 0 else None
        if num_heads is None:
            raise ValueError(f"{source}: a timm state dict does not record the number of heads and width {width} "
                             f"is not a paper variant; pass num_heads (--num-heads)")
        notes.append(f"timm state dicts do not record the heads: assumed num_heads={num_heads}")
    class_token = "cls_token" in tensors
    slots = _need(tensors, "pos_embed", source).shape[1] - class_token
    side = math.isqrt(slots)
    if side * side != slots:
        raise ValueError(f"{source}: {slots} patch position embeddings are not a square grid "
                         f"(pos_embed {tuple(tensors['pos_embed'].shape)}); pass image_size=(h, w)")
    rep = tensors.get("pre_logits.fc.weight")
    head = tensors.get("head.weight")
    notes.append("timm state dicts do not record the input normalisation: assumed mean = std = 0.5 "
                 "(override with --mean/--std, e.g. ImageNet statistics for DeiT weights)")
    resnet: dict[str, Any] = {}
    stride = patch  # input pixels per token
    if kind == "hybrid":
        layers = units_per_stage(tensors, "patch_embed.backbone." + _TIMM_UNIT, source)
        stem = _need(tensors, "patch_embed.backbone.stem.conv.weight" if layers else "patch_embed.backbone.conv.weight",
                     source)  # (resnet width, C, 7, 7)
        channels = stem.shape[1]
        resnet = dict(resnet_layers=layers, resnet_width=stem.shape[0], gn_eps=1e-5, ws_eps=1e-8, ws_form="var")
        stride *= 4 * 2 ** max(len(layers) - 1, 0)  # as HybridConfig.feature_stride
    return (HybridConfig if resnet else ViTConfig), dict(
        **resnet, image_size=side * stride, patch_size=patch, in_channels=channels, width=width, depth=depth,
        num_heads=num_heads, mlp_dim=mlp_dim, class_token=class_token,
        pool="map" if "attn_pool.latent" in tensors else "token" if class_token else "gap",
        qkv_bias="blocks.0.attn.qkv.bias" in tensors,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in tensors else 0.0,  # only its initial value is not recorded
        representation_size=rep.shape[0] if rep is not None else None,
        num_classes=head.shape[0] if head is not None else 0,
        gelu="exact", layer_norm_eps=1e-6, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), posemb_mode="bicubic",
    )


def check_exportable(cfg: ViTConfig | BiTConfig) -> None:
    """Refuse what timm's model cannot load or would compute differently."""
    if isinstance(cfg, (BiTConfig, HybridConfig)) and cfg.num_groups != 32:
        raise ValueError(f"timm's ResNet GroupNorm has 32 groups; this model has num_groups={cfg.num_groups}")
    if isinstance(cfg, BiTConfig):
        if (cfg.stem_kernel, cfg.stem_stride, cfg.stem_pool) != (7, 2, True):
            raise ValueError(f"timm's BiT stem is a 7x7/2 convolution and a max-pool; this model has stem_kernel="
                             f"{cfg.stem_kernel}, stem_stride={cfg.stem_stride}, stem_pool={cfg.stem_pool}")
        return
    if cfg.representation_size:
        raise ValueError("timm's VisionTransformer has no representation layer (pre_logits); export this model "
                         "to official .npz, or drop it first with model.reset_head(n, keep_pre_logits=False)")
    if cfg.class_token and cfg.pool == "gap":
        raise ValueError("a timm state dict cannot record pool='gap' next to a [class] token (it reads back as "
                         "pool='token'); this model has class_token=True, pool='gap'")
