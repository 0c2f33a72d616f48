"""Import foreign ViT checkpoints into vitlab and export vitlab models back out.

Formats: ``official`` (the paper's ``.npz``, ViT and R50+ViT hybrid), ``big_vision`` (``.npz``),
``bit`` (the BiT ResNet ``.npz``), ``timm`` (state dict, ``.safetensors`` or ``.pth``: ViT,
hybrid or BiT), ``hf`` (a Hugging Face folder). Each has one key map (``official.key_map``,
``bit_format.key_map``, ``timm_format.key_map``, ``hf_format.key_map``) read one way to import
and the other way to export.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import save_model
from ..config import BiTConfig, HybridConfig, ViTConfig, as_pair, replace_checked
from ..models import build_model
from . import bit_format, hf_format, official, timm_format
from .files import TORCH_SUFFIXES, read_npz, read_torch_weights, safetensors_metadata, write_npz, write_torch_weights
from .keymap import ImportReport, export_state, import_state

FORMATS = ("official", "big_vision", "bit", "timm", "hf")
# What the source framework computes with, kept even when ``like`` gives the architecture.
NUMERICS = ("gelu", "layer_norm_eps", "mean", "std", "posemb_mode", "gn_eps", "ws_eps", "ws_form")


def _read(path: Path, fmt: str | None) -> tuple[str, Any]:
    """Read ``path`` once: (format, source object). ``fmt`` None detects the format."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    hf_file = path.name in (*hf_format.WEIGHT_FILES, *hf_format.INDEX_FILES) and (path.parent / "config.json").is_file()
    if fmt == "hf" or (fmt is None and (path.is_dir() or hf_file)):
        return "hf", hf_format.read(path)
    if fmt in ("official", "big_vision", "bit") or (fmt is None and path.suffix == ".npz"):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} is not a file")
        tensors = read_npz(path)
        if fmt == "bit" or (fmt is None and bit_format.is_bit(tensors)):
            return "bit", tensors
        src = official.from_arrays(path, tensors, fmt)
        return src.flavour, src
    if fmt == "timm" or path.suffix in (*TORCH_SUFFIXES, ".safetensors"):
        if path.suffix == ".safetensors" and safetensors_metadata(path).get("format") == "vitlab":
            raise ValueError(f"{path} is already a vitlab model file; load it with vitlab.load_model")
        tensors = read_torch_weights(path)
        if fmt is None and any("patch_embeddings.projection" in k for k in tensors):
            raise ValueError(f"{path} holds Hugging Face ViT weights: convert the folder with its config.json")
        return "timm", tensors
    raise ValueError(f"cannot tell the format of {path} from its suffix; pass --from {'|'.join(FORMATS)}")


def describe(cfg: ViTConfig | BiTConfig) -> str:
    """One line: the architecture and the numerics of ``cfg``."""
    h, w = as_pair(cfg.image_size)
    if isinstance(cfg, BiTConfig):
        return (f"BiT ResNet-v2, units {cfg.layers}, width factor {cfg.width_factor}, stem {cfg.stem_width}, "
                f"{cfg.num_classes} classes; GroupNorm eps {cfg.gn_eps:g}, weight standardisation eps "
                f"{cfg.ws_eps:g}, mean {cfg.mean}, std {cfg.std}")
    resnet = (f"ResNet units {cfg.resnet_layers} width {cfg.resnet_width} (GroupNorm eps {cfg.gn_eps:g}, "
              f"weight standardisation {cfg.ws_form} eps {cfg.ws_eps:g}), " if isinstance(cfg, HybridConfig) else "")
    rep = f", representation {cfg.representation_size}" if cfg.representation_size else ""
    rep += ", sin-cos position embeddings" if cfg.posemb == "sincos2d" else ""
    return (f"{resnet}width {cfg.width}, depth {cfg.depth}, heads {cfg.num_heads}, MLP {cfg.mlp_dim}, "
            f"patch {cfg.patch_size}, {h}x{w} px, pool {cfg.pool}{rep}, {cfg.num_classes} classes; GELU {cfg.gelu}, "
            f"LayerNorm eps {cfg.layer_norm_eps:g}, mean {cfg.mean}, std {cfg.std}")


def import_model(src: str | os.PathLike | Mapping[str, torch.Tensor], fmt: str | None = None, *,
                 like: ViTConfig | BiTConfig | None = None, **overrides: Any) -> tuple[nn.Module, ImportReport]:
    """A vitlab model (eval mode) holding the weights of a foreign checkpoint, and the import report.

    The model is a ViT, an R50+ViT hybrid or a BiT ResNet, as the checkpoint holds. ``src``
    is a path, or a timm state dict in memory (``timm_model.state_dict()``).

    The architecture is read from the tensors (and config.json for ``hf``); ``like`` instead
    checks the checkpoint against that architecture and fails on the first mismatching key,
    naming both shapes. The source framework's numerics (GELU form, LayerNorm eps, input
    normalisation) are kept in the config. ``overrides`` replace config fields, e.g.
    ``num_heads`` (timm state dicts do not record it), ``mean``/``std``, ``image_size``.
    """
    if isinstance(src, Mapping):
        if fmt not in (None, "timm"):
            raise ValueError(f"a state dict in memory is read as timm's, not {fmt!r}")
        path, fmt, source = Path("<state dict>"), "timm", dict(src)
    else:
        path = Path(src)
        fmt, source = _read(path, fmt)
    notes: list[str] = []
    known = {**({k: getattr(like, k) for k in ("num_heads", "image_size") if hasattr(like, k)}), **overrides}
    if fmt in ("official", "big_vision"):
        cls, fields = official.config_fields(source, known.get("image_size"))
        tensors, notes = source.tensors, source.notes
    elif fmt == "bit":
        cls, fields, tensors = BiTConfig, bit_format.config_fields(source, path), source
    elif fmt == "timm":
        tensors = source
        cls, fields = timm_format.config_fields(tensors, str(path), notes, known.get("num_heads"))
    else:
        cls, fields = ViTConfig, hf_format.config_fields(source)
        tensors, notes = source.tensors, source.notes
    if like is not None:
        if type(like) is not cls:
            raise ValueError(f"{path} holds a {cls.__name__} checkpoint but the model it should match is a "
                             f"{type(like).__name__}; pick a preset of that family (or none)")
        cfg = replace_checked(like, **{k: fields[k] for k in NUMERICS if k in fields})
    else:
        cfg = cls(**fields)
    cfg = replace_checked(cfg, **overrides)
    model = build_model(cfg)
    report = ImportReport(fmt, str(path), notes=notes, architecture=describe(cfg))
    if fmt in ("official", "big_vision"):
        entries, ignore = official.key_map(cfg, fmt), (lambda key: None)
    elif fmt == "bit":
        entries, ignore = bit_format.key_map(cfg), (lambda key: None)
    elif fmt == "timm":
        entries, ignore = timm_format.key_map(cfg), (lambda key: None)
    else:
        entries, ignore = hf_format.key_map(cfg, source.prefix), hf_format.ignore(source)
        report.class_names = hf_format.class_names(source, cfg.num_classes)
    state = import_state(entries, tensors, model.state_dict(), report, ignore)
    model.load_state_dict(state)
    return model.eval(), report


def convert(src: str | os.PathLike, dst: str | os.PathLike, fmt: str | None = None, **kwargs: Any) -> ImportReport:
    """Import ``src`` (see ``import_model``) and save it as a vitlab model file that ``load_model`` reads."""
    model, report = import_model(src, fmt, **kwargs)
    save_model(model, dst, class_names=report.class_names,
               meta={"converted_from": str(src), "format": report.format, "notes": report.notes})
    return report


EXPORT_SUFFIXES = {".npz": "official", ".safetensors": "timm", ".pth": "timm", ".pt": "timm", ".bin": "timm"}


def export_format(dst: str | os.PathLike, cfg: Any = None) -> str:
    """The export format a destination implies: .npz official (bit for a BiT ``cfg``),
    .safetensors/.pth timm, a folder hf."""
    suffix = Path(dst).suffix
    if not suffix:
        return "hf"
    if suffix not in EXPORT_SUFFIXES:
        raise ValueError(f"cannot tell the export format from {suffix!r}; use .npz (official), .safetensors or "
                         f".pth (timm), .onnx, or a folder name (Hugging Face)")
    return "bit" if suffix == ".npz" and isinstance(cfg, BiTConfig) else EXPORT_SUFFIXES[suffix]


def export_model(model: nn.Module, dst: str | os.PathLike, fmt: str | None = None, *,
                 class_names: list[str] | None = None) -> Path:
    """Write ``model`` in a foreign format (the key map read backwards); ``fmt`` None follows ``dst``."""
    cfg = model.cfg
    fmt = fmt or export_format(dst, cfg)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if fmt != "timm" and fmt in FORMATS and (fmt == "bit") != isinstance(cfg, BiTConfig):
        raise ValueError(f"the {fmt!r} format holds " + ("only BiT ResNets" if fmt == "bit" else "no BiT ResNet")
                         + f"; this model is a {type(cfg).__name__} (export a BiT model as bit .npz or timm)")
    if getattr(cfg, "conv_stem", ()):
        raise ValueError(f"no {fmt} model has vitlab's convolutional stem (conv_stem={cfg.conv_stem}); keep this "
                         f"model as vitlab .safetensors or export it to ONNX (a fixed image size)")
    small_data = {"shifted_patches": getattr(cfg, "shifted_patches", False),
                  "locality_attention": getattr(cfg, "locality_attention", False),
                  "pool='seq'": getattr(cfg, "pool", "") == "seq",
                  "layer_scale": bool(getattr(cfg, "layer_scale", 0.0)) and fmt != "timm"}  # timm: ls1/ls2.gamma
    if used := [name for name, on in small_data.items() if on]:
        raise ValueError(f"no {fmt} model has {', '.join(used)}; keep this model as vitlab .safetensors or export "
                         f"it to ONNX" + (" (or timm, which holds layer_scale)" if used == ["layer_scale"] else ""))
    if fmt == "hf" and isinstance(cfg, HybridConfig):
        raise ValueError("vitlab writes Hugging Face folders for plain ViTs only; export the hybrid to official "
                         ".npz or timm")
    if fmt == "bit":
        bit_format.check_exportable(cfg)
        return write_npz(dst, export_state(bit_format.key_map(cfg), state))
    if fmt in ("official", "big_vision"):
        official.check_exportable(cfg, fmt)
        tensors = export_state(official.key_map(cfg, fmt), state)
        if fmt == "big_vision":
            tensors = {f"params/{k}": v for k, v in tensors.items()}
        return write_npz(dst, tensors)
    if fmt == "timm":
        timm_format.check_exportable(cfg)
        return write_torch_weights(dst, export_state(timm_format.key_map(cfg), state))
    if fmt == "hf":
        prefix = hf_format.export_prefix(cfg)
        return hf_format.write(dst, export_state(hf_format.key_map(cfg, prefix), state), cfg, class_names)
    raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)} (or a .onnx file)")
