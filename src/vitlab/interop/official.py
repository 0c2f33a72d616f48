"""The paper's released ``.npz`` checkpoints (google-research/vision_transformer) and big_vision's.

Both are Flax parameter trees flattened with ``/``. They differ in a few module names and in
where the position embedding lives:

==================  ====================================  =================================
                    official (``vit_jax/models_vit.py``)  big_vision (``models/vit.py``)
==================  ====================================  =================================
key prefix          none (old files: ``opt/target/``)     ``params/``
position embedding  ``Transformer/posembed_input/``       ``pos_embedding``, no [class]
                    ``pos_embedding``, [class] slot first slot (added before [class])
attention           ``MultiHeadDotProductAttention_1``    ``MultiHeadDotProductAttention_0``
second LayerNorm    ``LayerNorm_2``                       ``LayerNorm_1``
MLP                 ``MlpBlock_3``                        ``MlpBlock_0``
==================  ====================================  =================================

big_vision's ``posemb="sincos2d"`` is computed, not a parameter: such files have no
``pos_embedding`` and ``common.merge_params`` refuses a file that has one, so vitlab's
``posemb="sincos2d"`` models read and write none. Its ``pool_type="map"`` adds
``MAPHead_0/{probe, MultiHeadDotProductAttention_0/{query,key,value,out}, LayerNorm_0,
MlpBlock_0}`` (vitlab's ``attn_pool``: query from the probe, key and value from the tokens).

Numerics of both: ``nn.gelu`` is the tanh approximation, LayerNorm eps 1e-6, inputs in [-1, 1],
position embeddings resampled with ``scipy.ndimage.zoom(order=1)`` (vitlab's ``"scipy"`` mode).

The R50+ViT hybrid files (``vit_jax/models_vit.py`` with ``models_resnet.py``) add a ResNet
before the 1x1 ``embedding`` conv: ``conv_root``, ``gn_root``, ``block{s}/unit{u}/{conv,gn}{1,2,3}``
and ``{conv,gn}_proj`` (both 1-based). Their GroupNorm ``scale``/``bias`` are (1, 1, 1, C) (old
``flax.nn``; vit_jax's ``checkpoint._fix_groupnorm`` squeezes them), read as (C,) and written
as (C,), the shape of the current linen model. ``STEM_KEY_MAPS`` holds, per config type, the entries a
convolutional stem adds to the encoder's (``hybrid_stem`` for ``HybridConfig``); ``config_fields``
reads the ResNet depths and width from those names and shapes. The hybrid's numerics: flax
GroupNorm eps 1e-6, weight standardisation (w - mean) / (std + 1e-5).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import HybridConfig, ViTConfig
from ..models.posemb import sincos_posemb
from .files import read_npz
from .keymap import (Entry, conv_from_hwio, conv_to_hwio, dense, flatten, fused, norm_vector, one, out_kernel_in,
                     out_kernel_out, qkv_kernel_in, qkv_kernel_out, unflatten, units_per_stage)

NAMES = {
    "official": dict(posemb="Transformer/posembed_input/pos_embedding", attn="MultiHeadDotProductAttention_1",
                     ln2="LayerNorm_2", mlp="MlpBlock_3"),
    "big_vision": dict(posemb="pos_embedding", attn="MultiHeadDotProductAttention_0", ln2="LayerNorm_1",
                       mlp="MlpBlock_0"),
}
PREFIXES = ("params/img/", "params/", "opt/target/")

# Config type name -> extra entries for a convolutional stem (filled below: the R50 hybrid).
STEM_KEY_MAPS: dict[str, Callable[[Any], list[Entry]]] = {}
UNIT = r"block(\d+)/unit(\d+)/"
MAP = "MAPHead_0/"


@dataclass
class NpzSource:
    """The arrays of an ``.npz`` checkpoint with the prefix removed, and what was done to read them."""

    path: Path
    flavour: str  # "official" or "big_vision"
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


def _unstack_scanned(tensors: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """big_vision ``scan=True`` files stack all blocks under ``Transformer/encoderblock/``: split them."""
    stacked = [k for k in tensors if k.startswith("Transformer/encoderblock/")]
    if not stacked:
        return tensors
    depth = tensors[stacked[0]].shape[0]
    out = {k: v for k, v in tensors.items() if k not in stacked}
    for key in stacked:
        for i in range(depth):
            out[key.replace("encoderblock/", f"encoderblock_{i}/")] = tensors[key][i]
    notes.append(f"split the {depth} scanned (stacked) encoder blocks into encoderblock_0..{depth - 1}")
    return out


def read(path: str | Path, flavour: str | None = None) -> NpzSource:
    """Read an official or big_vision ``.npz``; ``flavour`` None detects it from the module names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return from_arrays(path, read_npz(path), flavour)


def from_arrays(path: Path, tensors: dict[str, torch.Tensor], flavour: str | None = None) -> NpzSource:
    """``read`` for arrays already read from ``path``."""
    notes: list[str] = []
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "embedding/") for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            notes.append(f"read the parameters under {prefix!r}")
            break
    tensors = _unstack_scanned(tensors, notes)
    if flavour is None:
        flavour = detect_flavour(tensors)
        if flavour is None:
            raise ValueError(f"{path} is not an official or big_vision ViT .npz (no encoderblock_0 attention "
                             f"found among {sorted(tensors)[:6]}); pick the format with --from")
    return NpzSource(path, flavour, tensors, notes)


def detect_flavour(tensors: dict[str, torch.Tensor]) -> str | None:
    """"official" or "big_vision" from the attention module's name in the first block; None if neither."""
    for flavour, names in NAMES.items():
        if f"Transformer/encoderblock_0/{names['attn']}/query/kernel" in tensors:
            return flavour
    return None


def _need(src: NpzSource, key: str) -> torch.Tensor:
    if key not in src.tensors:
        raise ValueError(f"{src.path} is not a {src.flavour} ViT checkpoint: it has no {key!r} "
                         f"(keys: {', '.join(sorted(src.tensors)[:6])}, ...); pick the format with --from")
    return src.tensors[key]


def _resnet_fields(src: NpzSource) -> dict[str, Any]:
    """The hybrid's ResNet: stem width from ``conv_root``, units per stage from ``block{s}/unit{u}``."""
    if src.flavour != "official":
        raise ValueError(f"{src.path}: big_vision has no R50+ViT hybrid; read it with --from official")
    root = src.tensors["conv_root/kernel"]  # (7, 7, C, width)
    return dict(resnet_width=root.shape[3], resnet_layers=units_per_stage(src.tensors, UNIT, str(src.path), first=1),
                gn_eps=1e-6, ws_eps=1e-5, ws_form="std")


def config_fields(src: NpzSource, image_size: int | tuple[int, int] | None = None) -> tuple[type, dict[str, Any]]:
    """The config class (``ViTConfig`` or ``HybridConfig``) and fields the arrays imply (shapes),
    plus the JAX code's numerics."""
    hybrid = _resnet_fields(src) if "conv_root/kernel" in src.tensors else {}
    names = NAMES[src.flavour]
    kernel = _need(src, "embedding/kernel")  # (P, P, C, D)
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"{src.path}: embedding/kernel has shape {tuple(kernel.shape)}, expected (P, P, C, D)")
    patch, _, channels, width = kernel.shape
    depth = 1 + max(int(m.group(1)) for k in src.tensors if (m := re.match(r"Transformer/encoderblock_(\d+)/", k)))
    block = "Transformer/encoderblock_0/"
    query = _need(src, f"{block}{names['attn']}/query/kernel")  # (D, heads, head_dim)
    class_token = "cls" in src.tensors
    sincos = src.flavour == "big_vision" and names["posemb"] not in src.tensors
    if sincos:
        src.notes.append("no pos_embedding: big_vision posemb='sincos2d', a fixed table computed for the input size")
    fields: dict[str, Any] = dict(
        patch_size=patch, in_channels=channels, width=width, depth=depth, num_heads=query.shape[1],
        mlp_dim=_need(src, f"{block}{names['mlp']}/Dense_0/kernel").shape[1], posemb="sincos2d" if sincos else "learn",
        class_token=class_token, pool="map" if f"{MAP}probe" in src.tensors else "token" if class_token else "gap",
        qkv_bias=f"{block}{names['attn']}/query/bias" in src.tensors,
        representation_size=src.tensors["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in src.tensors else None,
        num_classes=src.tensors["head/bias"].shape[0] if "head/bias" in src.tensors else 0,
        gelu="tanh", layer_norm_eps=1e-6, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), posemb_mode="scipy",
    )
    if hybrid:
        fields.update(hybrid, in_channels=src.tensors["conv_root/kernel"].shape[2])
    cls = HybridConfig if hybrid else ViTConfig
    # Pixels per token: the patch times the ResNet's stride (as HybridConfig.feature_stride).
    stride = patch * (4 * 2 ** max(len(hybrid["resnet_layers"]) - 1, 0) if hybrid else 1)
    if image_size is not None:
        fields["image_size"] = image_size
    elif names["posemb"] in src.tensors:
        slots = src.tensors[names["posemb"]].shape[1] - (class_token and src.flavour == "official")
        side = math.isqrt(slots)
        if side * side != slots:
            raise ValueError(f"{src.path}: {slots} position embeddings are not a square grid; pass image_size=(h, w)")
        fields["image_size"] = side * stride
    else:
        fields["image_size"] = 224
    return cls, fields


def _linear(ours: str, theirs: str) -> list[Entry]:
    return [one(f"{ours}.weight", f"{theirs}/kernel", dense, dense), one(f"{ours}.bias", f"{theirs}/bias")]


def _norm(ours: str, theirs: str) -> list[Entry]:
    return [one(f"{ours}.weight", f"{theirs}/scale"), one(f"{ours}.bias", f"{theirs}/bias")]


def _gn(ours: str, theirs: str) -> list[Entry]:
    """A hybrid GroupNorm: (1, 1, 1, C) in the released files or (C,), written as (C,)."""
    return [one(f"{ours}.weight", f"{theirs}/scale", norm_vector), one(f"{ours}.bias", f"{theirs}/bias", norm_vector)]


def _map_head(cfg: ViTConfig) -> list[Entry]:
    """big_vision's ``MAPHead_0`` <-> ``attn_pool``: probe, attention (``q`` from the probe, fused
    ``kv`` from the tokens), LayerNorm, MLP."""
    heads, attn = cfg.num_heads, f"{MAP}MultiHeadDotProductAttention_0/"
    bias_in, bias_out = flatten, unflatten(heads, cfg.width // heads)
    return [one("attn_pool.latent", f"{MAP}probe"),
            one("attn_pool.q.weight", f"{attn}query/kernel", qkv_kernel_in, qkv_kernel_out(heads)),
            one("attn_pool.q.bias", f"{attn}query/bias", bias_in, bias_out),
            fused("attn_pool.kv.weight", [f"{attn}key/kernel", f"{attn}value/kernel"], qkv_kernel_in,
                  qkv_kernel_out(heads)),
            fused("attn_pool.kv.bias", [f"{attn}key/bias", f"{attn}value/bias"], bias_in, bias_out),
            one("attn_pool.proj.weight", f"{attn}out/kernel", out_kernel_in, out_kernel_out(heads)),
            one("attn_pool.proj.bias", f"{attn}out/bias"),
            *_norm("attn_pool.norm", f"{MAP}LayerNorm_0"),
            *_linear("attn_pool.mlp.fc1", f"{MAP}MlpBlock_0/Dense_0"),
            *_linear("attn_pool.mlp.fc2", f"{MAP}MlpBlock_0/Dense_1")]


def _posemb(cfg: ViTConfig, flavour: str) -> list[Entry]:
    if flavour == "big_vision" and cfg.posemb == "sincos2d":  # computed on import, not written on export
        table = Entry(("pos_embed",), (), lambda ts: [sincos_posemb(cfg.grid_size, cfg.width, cfg.num_prefix_tokens)],
                      lambda ts: [])
        return ([one("cls_token", "cls")] if cfg.class_token else []) + [table]
    if flavour == "official":
        return ([one("cls_token", "cls")] if cfg.class_token else []) + [one("pos_embed", NAMES[flavour]["posemb"])]
    if not cfg.class_token:
        return [one("pos_embed", "pos_embedding")]
    # big_vision adds the position embedding before the [class] token: its slot is zero here,
    # and on export cls + pos_embed[0] is what the [class] token receives.
    return [Entry(
        ("cls_token", "pos_embed"), ("cls", "pos_embedding"),
        lambda ts: [ts[0], torch.cat([torch.zeros_like(ts[0]), ts[1]], dim=1)],
        lambda ts: [ts[0] + ts[1][:, :1], ts[1][:, 1:]],
    )]


def _conv(ours: str, theirs: str) -> Entry:
    return one(f"{ours}.weight", f"{theirs}/kernel", conv_from_hwio, conv_to_hwio)


def hybrid_stem(cfg: HybridConfig) -> list[Entry]:
    """The hybrid's ResNet: ``patch_embed.{conv_root,gn_root,stages.s.u.*}`` <-> ``conv_root``,
    ``gn_root``, ``block{s+1}/unit{u+1}/*`` (its 1x1 ``embedding`` is the encoder's)."""
    entries = [_conv("patch_embed.conv_root", "conv_root"), *_gn("patch_embed.gn_root", "gn_root")]
    cin = cfg.resnet_width
    for s, units in enumerate(cfg.resnet_layers):
        cout = 4 * cfg.resnet_width * 2**s
        for u in range(units):
            ours, theirs = f"patch_embed.stages.{s}.{u}.", f"block{s + 1}/unit{u + 1}/"
            for name in ("1", "2", "3") if u or (s == 0 and cin == cout) else ("1", "2", "3", "_proj"):
                entries += [_conv(f"{ours}conv{name}", f"{theirs}conv{name}"),
                            *_gn(f"{ours}gn{name}", f"{theirs}gn{name}")]
        cin = cout
    return entries


STEM_KEY_MAPS["HybridConfig"] = hybrid_stem


def key_map(cfg: ViTConfig, flavour: str) -> list[Entry]:
    """The table vitlab key <-> ``flavour`` key, with the exact transform of each tensor."""
    names = NAMES[flavour]
    heads, d = cfg.num_heads, cfg.width
    entries = [one("patch_embed.proj.weight", "embedding/kernel", conv_from_hwio, conv_to_hwio),
               one("patch_embed.proj.bias", "embedding/bias"), *_posemb(cfg, flavour)]
    entries += STEM_KEY_MAPS.get(type(cfg).__name__, lambda c: [])(cfg)
    for i in range(cfg.depth):
        ours, theirs = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attn = f"{theirs}{names['attn']}/"
        entries += _norm(ours + "norm1", theirs + "LayerNorm_0")
        entries.append(fused(ours + "attn.qkv.weight", [f"{attn}{n}/kernel" for n in ("query", "key", "value")],
                             qkv_kernel_in, qkv_kernel_out(heads)))
        if cfg.qkv_bias:
            entries.append(fused(ours + "attn.qkv.bias", [f"{attn}{n}/bias" for n in ("query", "key", "value")],
                                 flatten, unflatten(heads, d // heads)))
        entries += [one(ours + "attn.proj.weight", f"{attn}out/kernel", out_kernel_in, out_kernel_out(heads)),
                    one(ours + "attn.proj.bias", f"{attn}out/bias")]
        entries += _norm(ours + "norm2", f"{theirs}{names['ln2']}")
        entries += _linear(ours + "mlp.fc1", f"{theirs}{names['mlp']}/Dense_0")
        entries += _linear(ours + "mlp.fc2", f"{theirs}{names['mlp']}/Dense_1")
    entries += _norm("norm", "Transformer/encoder_norm")
    if cfg.pool == "map":
        entries += _map_head(cfg)
    if cfg.representation_size:
        entries += _linear("pre_logits.0", "pre_logits")
    if cfg.num_classes:
        entries += _linear("head", "head")
    return entries


def check_exportable(cfg: ViTConfig, flavour: str) -> None:
    """Refuse what the JAX model cannot express (it would load but compute something else)."""
    if isinstance(cfg, HybridConfig) and flavour != "official":
        raise ValueError(f"{flavour} has no R50+ViT hybrid; export this model with --to official")
    if isinstance(cfg, HybridConfig) and cfg.num_groups != 32:
        raise ValueError(f"the official hybrid's GroupNorm has 32 groups; this model has num_groups={cfg.num_groups}")
    if cfg.pool == "map" and flavour != "big_vision":
        raise ValueError(f"the {flavour} ViT has no MAP head (pool='map'); export this model with --to big_vision")
    if cfg.class_token and cfg.pool != "token":
        raise ValueError(f"the {flavour} ViT has a [class] token only with pool='token'; this model has "
                         f"class_token=True, pool={cfg.pool!r}")
    if not cfg.qkv_bias:
        raise ValueError(f"the {flavour} ViT always has query/key/value biases; this model has qkv_bias=False")
