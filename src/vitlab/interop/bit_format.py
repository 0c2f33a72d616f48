"""The Big Transfer (BiT) ``.npz`` checkpoints (google-research/big_transfer, e.g. ``BiT-M-R50x1.npz``).

Names (all under ``resnet/``; ``bit_pytorch/models.py`` ``load_from``), HWIO kernels:

=====================================================  ==============================
``root_block/standardized_conv2d/kernel``              ``conv_root.weight``
``block{s}/unit{u:02d}/{a,b,c}/standardized_conv2d``   ``stages.{s-1}.{u-1}.conv{1,2,3}``
``block{s}/unit{u:02d}/{a,b,c}/group_norm/{gamma,beta}``  ``...gn{1,2,3}``: the norm
                                                       *before* conv a, b, c (pre-activation)
``block{s}/unit{u:02d}/a/proj/standardized_conv2d``    ``...downsample``
``group_norm/{gamma,beta}``, ``head/conv2d``           ``norm``, ``head`` (a 1x1 conv)
=====================================================  ==============================

Numerics (``bit_pytorch``): GroupNorm eps 1e-5, weight standardisation sqrt(var + 1e-10),
inputs in [-1, 1]; ``BiTConfig``'s defaults.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import BiTConfig
from .keymap import Entry, conv_from_hwio, conv_to_hwio, one, units_per_stage

PREFIX = "resnet/"
ROOT = f"{PREFIX}root_block/standardized_conv2d/kernel"
UNIT = rf"{PREFIX}block(\d+)/unit(\d+)/"


def is_bit(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the arrays are a BiT ResNet (its root block is there)."""
    return ROOT in tensors


def config_fields(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """The ``BiTConfig`` fields the arrays imply: stem width, units per stage, classes."""
    if not is_bit(tensors):
        raise ValueError(f"{path} is not a BiT .npz: it has no {ROOT!r} (keys: {', '.join(sorted(tensors)[:6])}, "
                         f"...); pick the format with --from")
    root = tensors[ROOT]  # (7, 7, C, stem)
    layers = units_per_stage(tensors, UNIT, str(path), first=1)
    stem = root.shape[3]
    factor = stem // 64 if stem % 64 == 0 else 1
    head = tensors.get(f"{PREFIX}head/conv2d/bias")
    return dict(in_channels=root.shape[2], layers=layers, width_factor=factor,
                stem_width=stem // factor, num_classes=head.shape[0] if head is not None else 0,
                gn_eps=1e-5, ws_eps=1e-10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _head_in(t: torch.Tensor) -> torch.Tensor:
    """1x1 conv kernel (1, 1, in, out) -> Linear weight (out, in)."""
    return t[0, 0].T


def _head_out(w: torch.Tensor) -> torch.Tensor:
    """Linear weight (out, in) -> 1x1 conv kernel (1, 1, in, out)."""
    return w.T[None, None]


def _conv(ours: str, theirs: str) -> Entry:
    return one(ours, f"{theirs}standardized_conv2d/kernel", conv_from_hwio, conv_to_hwio)


def _norm(ours: str, theirs: str) -> list[Entry]:
    return [one(f"{ours}.weight", f"{theirs}group_norm/gamma"), one(f"{ours}.bias", f"{theirs}group_norm/beta")]


def key_map(cfg: BiTConfig) -> list[Entry]:
    """The table vitlab ``ResNetV2`` key <-> BiT ``.npz`` key, with the exact transform of each tensor."""
    entries = [_conv("conv_root.weight", f"{PREFIX}root_block/")]
    cin = cfg.stem_width * cfg.width_factor
    for s, (units, cout) in enumerate(zip(cfg.layers, cfg.widths)):
        for u in range(units):
            ours, theirs = f"stages.{s}.{u}.", f"{PREFIX}block{s + 1}/unit{u + 1:02d}/"
            for i, part in enumerate("abc", start=1):  # part a: gn1 -> conv1, b: gn2 -> conv2, c: gn3 -> conv3
                entries += [_conv(f"{ours}conv{i}.weight", f"{theirs}{part}/"),
                            *_norm(f"{ours}gn{i}", f"{theirs}{part}/")]
            if u == 0 and (s > 0 or cin != cout):
                entries.append(_conv(f"{ours}downsample.weight", f"{theirs}a/proj/"))
        cin = cout
    entries += _norm("norm", PREFIX)
    if cfg.num_classes:
        entries += [one("head.weight", f"{PREFIX}head/conv2d/kernel", _head_in, _head_out),
                    one("head.bias", f"{PREFIX}head/conv2d/bias")]
    return entries


def check_exportable(cfg: BiTConfig) -> None:
    """Refuse what the BiT code cannot express (it would load but compute something else)."""
    if cfg.num_groups != 32:
        raise ValueError(f"BiT's GroupNorm has 32 groups; this model has num_groups={cfg.num_groups}")
