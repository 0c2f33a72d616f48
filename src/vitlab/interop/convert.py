"""Import foreign ViT checkpoints into vitlab and export vitlab models back out.

Formats: ``official`` (the paper's ``.npz``), ``big_vision`` (``.npz``), ``timm`` (state dict,
``.safetensors`` or ``.pth``), ``hf`` (a Hugging Face folder). Each has one key map
(``official.key_map``, ``timm_format.key_map``, ``hf_format.key_map``) read one way to import
and the other way to export.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..checkpoint import save_model
from ..config import ViTConfig, as_pair, replace_checked
from ..models import build_model
from ..models.vit import VisionTransformer
from . import hf_format, official, timm_format
from .files import TORCH_SUFFIXES, read_torch_weights, safetensors_metadata, write_npz, write_torch_weights
from .keymap import ImportReport, export_state, import_state

FORMATS = ("official", "big_vision", "timm", "hf")
# What the source framework computes with, kept even when ``like`` gives the architecture.
NUMERICS = ("gelu", "layer_norm_eps", "mean", "std", "posemb_mode")


def _read(path: Path, fmt: str | None) -> tuple[str, Any]:
    """Read ``path`` once: (format, source object). ``fmt`` None detects the format."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    hf_file = path.name in (*hf_format.WEIGHT_FILES, *hf_format.INDEX_FILES) and (path.parent / "config.json").is_file()
    if fmt == "hf" or (fmt is None and (path.is_dir() or hf_file)):
        return "hf", hf_format.read(path)
    if fmt in ("official", "big_vision") or (fmt is None and path.suffix == ".npz"):
        src = official.read(path, fmt)
        return src.flavour, src
    if fmt == "timm" or path.suffix in (*TORCH_SUFFIXES, ".safetensors"):
        if path.suffix == ".safetensors" and safetensors_metadata(path).get("format") == "vitlab":
            raise ValueError(f"{path} is already a vitlab model file; load it with vitlab.load_model")
        tensors = read_torch_weights(path)
        if fmt is None and any("patch_embeddings.projection" in k for k in tensors):
            raise ValueError(f"{path} holds Hugging Face ViT weights: convert the folder with its config.json")
        return "timm", tensors
    raise ValueError(f"cannot tell the format of {path} from its suffix; pass --from {'|'.join(FORMATS)}")


def describe(cfg: ViTConfig) -> str:
    """One line: the architecture and the numerics of ``cfg``."""
    h, w = as_pair(cfg.image_size)
    rep = f", representation {cfg.representation_size}" if cfg.representation_size else ""
    return (f"width {cfg.width}, depth {cfg.depth}, heads {cfg.num_heads}, MLP {cfg.mlp_dim}, patch {cfg.patch_size}, "
            f"{h}x{w} px, pool {cfg.pool}{rep}, {cfg.num_classes} classes; GELU {cfg.gelu}, "
            f"LayerNorm eps {cfg.layer_norm_eps:g}, mean {cfg.mean}, std {cfg.std}")


def import_model(src: str | os.PathLike, fmt: str | None = None, *, like: ViTConfig | None = None,
                 **overrides: Any) -> tuple[VisionTransformer, ImportReport]:
    """A vitlab ViT (eval mode) holding the weights of a foreign checkpoint, and the import report.

    The architecture is read from the tensors (and config.json for ``hf``); ``like`` instead
    checks the checkpoint against that architecture and fails on the first mismatching key,
    naming both shapes. The source framework's numerics (GELU form, LayerNorm eps, input
    normalisation) are kept in the config. ``overrides`` replace config fields, e.g.
    ``num_heads`` (timm state dicts do not record it), ``mean``/``std``, ``image_size``.
    """
    path = Path(src)
    fmt, source = _read(path, fmt)
    notes: list[str] = []
    known = {**({"num_heads": like.num_heads, "image_size": like.image_size} if like else {}), **overrides}
    if fmt in ("official", "big_vision"):
        fields = official.config_fields(source, known.get("image_size"))
        tensors, notes = source.tensors, source.notes
    elif fmt == "timm":
        tensors = source
        fields = timm_format.config_fields(tensors, str(path), notes, known.get("num_heads"))
    else:
        fields = hf_format.config_fields(source)
        tensors, notes = source.tensors, source.notes
    if like is not None:
        cfg = replace_checked(like, **{k: fields[k] for k in NUMERICS})
    else:
        cfg = ViTConfig(**fields)
    cfg = replace_checked(cfg, **overrides)
    model = build_model(cfg)
    report = ImportReport(fmt, str(path), notes=notes, architecture=describe(cfg))
    if fmt in ("official", "big_vision"):
        official.fill_sincos(source, cfg)
        entries, ignore = official.key_map(cfg, fmt), (lambda key: None)
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


def export_format(dst: str | os.PathLike) -> str:
    """The export format a destination implies: .npz official, .safetensors/.pth timm, a folder hf."""
    suffix = Path(dst).suffix
    if not suffix:
        return "hf"
    if suffix not in EXPORT_SUFFIXES:
        raise ValueError(f"cannot tell the export format from {suffix!r}; use .npz (official), .safetensors or "
                         f".pth (timm), .onnx, or a folder name (Hugging Face)")
    return EXPORT_SUFFIXES[suffix]


def export_model(model: VisionTransformer, dst: str | os.PathLike, fmt: str | None = None, *,
                 class_names: list[str] | None = None) -> Path:
    """Write ``model`` in a foreign format (the key map read backwards); ``fmt`` None follows ``dst``."""
    fmt = fmt or export_format(dst)
    cfg = model.cfg
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
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
