"""timm ``VisionTransformer`` state dicts (``timm/models/vision_transformer.py``).

vitlab's module names follow timm's, so the table is a rename only for the old
representation layer (``pre_logits.fc``, timm < 0.6). timm's numerics: exact GELU,
LayerNorm eps 1e-6. A state dict records neither the number of heads nor the input
normalisation: the heads come from the paper's table by width (else head_dim 64), the
normalisation defaults to mean = std = 0.5 (the AugReg weights); override either.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..config import ViTConfig
from ..models.vit import VARIANTS, VisionTransformer
from .keymap import Entry, one

RENAMES = {"pre_logits.0.weight": "pre_logits.fc.weight", "pre_logits.0.bias": "pre_logits.fc.bias"}


def vitlab_keys(cfg: ViTConfig) -> list[str]:
    """The state-dict keys of a vitlab ViT with this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        return list(VisionTransformer(cfg).state_dict())


def key_map(cfg: ViTConfig) -> list[Entry]:
    """The table vitlab key <-> timm key (all tensors as they are)."""
    return [one(key, RENAMES.get(key, key)) for key in vitlab_keys(cfg)]


def _need(tensors: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{source} is not a timm VisionTransformer state dict: it has no {key!r} "
                         f"(keys: {', '.join(sorted(tensors)[:6])}, ...); pick the format with --from")
    return tensors[key]


def config_fields(tensors: dict[str, torch.Tensor], source: str, notes: list[str],
                  num_heads: int | None = None) -> dict[str, Any]:
    """The ``ViTConfig`` fields the tensors imply, plus timm's numerics."""
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
    return dict(
        image_size=side * patch, patch_size=patch, in_channels=channels, width=width, depth=depth,
        num_heads=num_heads, mlp_dim=mlp_dim, class_token=class_token, pool="token" if class_token else "gap",
        qkv_bias="blocks.0.attn.qkv.bias" in tensors,
        representation_size=rep.shape[0] if rep is not None else None,
        num_classes=head.shape[0] if head is not None else 0,
        gelu="exact", layer_norm_eps=1e-6, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), posemb_mode="bicubic",
    )


def check_exportable(cfg: ViTConfig) -> None:
    """Refuse what timm's ``VisionTransformer`` cannot load or would compute differently."""
    if cfg.representation_size:
        raise ValueError("timm's VisionTransformer has no representation layer (pre_logits); export this model "
                         "to official .npz, or drop it first with model.reset_head(n, keep_pre_logits=False)")
    if cfg.class_token and cfg.pool == "gap":
        raise ValueError("a timm state dict cannot record pool='gap' next to a [class] token (it reads back as "
                         "pool='token'); this model has class_token=True, pool='gap'")
