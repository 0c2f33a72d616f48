"""Names to models: fetch a catalog entry's file, convert it, attach its labels and preprocessing."""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..accel import accelerate
from ..checkpoint import LoadedModel, load_state_dict_checked, resolve_model_file
from ..checkpoint import load_model as load_model_file
from ..config import replace_checked
from ..data.images import Preprocess
from ..deploy import load_exported, runtime_for
from ..interop import import_model
from ..models import build_model
from ..models import create_model as create_fresh
from ..models import model_config
from . import augreg, cache, hf
from .catalog import HF_PREFIX, Pretrained, get_pretrained, labels, preprocess_dict, suggest
from .catalog import is_pretrained_name as in_catalog

HF_RESAMPLE = {2: "bilinear", 3: "bicubic", 0: "nearest"}  # PIL resample codes in preprocessor_config.json


def entry_for(name: str) -> Pretrained:
    """The entry of a catalog name, a bare preset (its default tag), ``hf-hub:ORG/REPO`` or ``augreg:FILE``."""
    return augreg.entry(name) if name.startswith(augreg.PREFIX) else get_pretrained(name)


def is_pretrained_name(ref: str) -> bool:
    """True if ``ref`` names a released model rather than a path."""
    return ref.startswith(augreg.PREFIX) or in_catalog(ref)


def fetch(entry: Pretrained, *, progress: bool = True) -> Path:
    """The entry's local file (a folder for Hugging Face repositories), downloaded into the cache if needed."""
    if entry.kind == "gcs":
        path = entry.source["gcs"]
        return cache.fetch(cache.gcs_url(path), cache.cache_path("gcs", path), sha256=entry.sha256,
                           size=entry.size, progress=progress, name=entry.name)
    if entry.kind == "hf":
        return hf.fetch_repo(entry.source["hf"], entry.source.get("revision", "main"), entry.source.get("files"),
                             sha256=entry.sha256)
    path = Path(str(resources.files(__package__).joinpath("models", entry.source["package"])))
    if entry.sha256 and (actual := cache.sha256_file(path)) != entry.sha256:
        raise ValueError(f"the packaged model {path} fails its check: sha256 {actual} is not {entry.sha256}; "
                         f"reinstall vitlab")
    return path


def _hf_settings(folder: Path, entry: Pretrained) -> tuple[str, Preprocess | None, list[str] | None]:
    """(format, preprocessing, class names) that an HF repository's own files give."""
    config = json.loads((folder / "config.json").read_text())
    if "architecture" in config:  # a timm repository
        pre = config.get("pretrained_cfg", {})
        size = pre.get("input_size", [3, 224, 224])[-1]
        preprocess = Preprocess(image_size=size, crop_pct=pre.get("crop_pct", 1.0),
                                interpolation=pre.get("interpolation", "bicubic"), resize="shorter",
                                mean=tuple(pre.get("mean", (0.5,) * 3)), std=tuple(pre.get("std", (0.5,) * 3)))
        return "timm", preprocess, config.get("label_names")
    proc_file = folder / "preprocessor_config.json"
    if not proc_file.is_file():
        return "hf", None, None
    proc = json.loads(proc_file.read_text())
    size = proc.get("size", 224)
    size = size.get("height", size.get("shortest_edge", 224)) if isinstance(size, dict) else size
    preprocess = Preprocess(image_size=int(size), crop_pct=1.0,
                            interpolation=HF_RESAMPLE.get(proc.get("resample", 2), "bilinear"), resize="squash",
                            mean=tuple(proc.get("image_mean", (0.5,) * 3)), std=tuple(proc.get("image_std", (0.5,) * 3)))
    return "hf", preprocess, None


def load_pretrained(name: str, *, map_location: str | torch.device = "cpu", progress: bool = True) -> LoadedModel:
    """The released model ``name`` (eval mode) with its class names and preprocessing in ``meta``."""
    entry = entry_for(name)
    return load_entry(entry, fetch(entry, progress=progress), map_location=map_location)


def load_entry(entry: Pretrained, path: Path, *, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Read ``path`` as the file of ``entry``: converted, checked against the catalog, labelled.

    This is also how a file carried by hand is checked (``vitlab hub import``, ``vitlab convert
    --model NAME``): every key and shape must fit, and the classes and resolution the catalog's.
    """
    preprocess = entry.preprocess if entry.image_size else None
    class_names = labels(entry.labels) if entry.labels else None
    if entry.format == "vitlab":
        loaded = load_model_file(path, map_location=map_location)
        model, class_names = loaded.model, class_names or loaded.class_names
    else:
        fmt, src = entry.format, path
        overrides: dict[str, Any] = {}
        if entry.kind == "hf":
            fmt, hf_preprocess, hf_labels = _hf_settings(path, entry)
            preprocess, class_names = preprocess or hf_preprocess, class_names or hf_labels
            if fmt == "timm":
                src = next(path / w for w in hf.WEIGHT_FILES if (path / w).is_file())
                if entry.architecture:
                    overrides["num_heads"] = model_config(entry.architecture).num_heads
        if preprocess is not None:
            overrides.update(mean=tuple(preprocess.mean), std=tuple(preprocess.std))
            if fmt in ("bit", "timm"):  # their weights do not record the resolution
                overrides["image_size"] = preprocess.image_size
        model, report = import_model(src, fmt, **overrides)
        class_names = class_names or report.class_names
        model.to(map_location)
    cfg = model.cfg
    for field, want in (("num_classes", entry.num_classes), ("image_size", entry.image_size)):
        got = getattr(cfg, field)
        if want and got not in (want, (want, want)):
            raise ValueError(f"{entry.name}: the file {path} holds {field} {got}, the catalog says {want}; "
                             f"is the cached file the right one? (`vitlab hub cache --prune {entry.name}`)")
    if class_names is not None and len(class_names) != cfg.num_classes:
        raise ValueError(f"{entry.name}: {len(class_names)} class names for a {cfg.num_classes}-way head")
    preprocess = preprocess or Preprocess(image_size=int(_square(cfg.image_size)), mean=tuple(cfg.mean),
                                          std=tuple(cfg.std))
    meta = {"pretrained": entry.name, "model": entry.architecture or None, "file": str(path),
            "preprocess": preprocess_dict(preprocess), "license": entry.license, "accuracy": entry.accuracy,
            "source": entry.source}
    return LoadedModel(accelerate(model).eval(), class_names, meta)


def _square(size: int | tuple[int, int]) -> int:
    return size if isinstance(size, int) else size[0]


def load_model(ref: str | os.PathLike, *, map_location: str | torch.device = "cpu", runtime: str | None = None,
               precision: str = "fp32") -> LoadedModel:
    """A run directory, a vitlab model file, or a released model's name -> LoadedModel.

    An exported model (``.onnx``, OpenVINO ``.xml``) runs on its runtime, at ``precision`` where the
    runtime has a choice (``vitlab.deploy.load_exported``); ``runtime`` forces one.
    """
    if runtime_for(ref, runtime):
        return load_exported(ref, runtime=runtime, precision=precision)
    if isinstance(ref, str) and not Path(ref).exists() and is_pretrained_name(ref):
        return load_pretrained(ref, map_location=map_location)
    if isinstance(ref, str) and not Path(ref).exists() and (near := suggest(ref)):
        raise FileNotFoundError(f"{ref!r} is neither a file, a run directory nor a model name; did you mean "
                                f"{', '.join(near)}? (`vitlab hub list`)")
    return load_model_file(ref, map_location=map_location)


def model_file(ref: str | os.PathLike) -> Path:
    """The local file behind a reference: the run's model file, or a released model's cached download."""
    if isinstance(ref, str) and not Path(ref).exists() and is_pretrained_name(ref):
        return fetch(entry_for(ref))
    return resolve_model_file(ref)


def create_model(name: str, pretrained: bool = False, *, num_classes: int | None = None,
                 image_size: int | tuple[int, int] | None = None, **overrides: Any) -> nn.Module:
    """A model by name, as timm's ``create_model``: ``create_model("vit_b16.augreg_in21k", pretrained=True)``.

    Without ``pretrained`` a preset (or a catalog name's architecture) is built fresh. With it,
    the released weights are loaded (a bare preset takes its default tag) and the model carries
    ``pretrained_cfg`` (name, class names, preprocessing, license, accuracy; see ``transform_for``).
    ``num_classes`` different from the file's puts a new zero head on; ``image_size`` resamples
    the position embeddings; ``overrides`` change non-architecture fields (``drop_path=0.1``).
    """
    if not pretrained:
        if "." not in name and not name.startswith(HF_PREFIX):
            return accelerate(create_fresh(name, num_classes=num_classes, image_size=image_size, **overrides))
        entry = entry_for(name)
        if not entry.architecture:
            raise ValueError(f"{name} names no vitlab preset; pass pretrained=True to read its architecture")
        return accelerate(create_fresh(entry.architecture, num_classes=num_classes or entry.num_classes,
                                       image_size=image_size or entry.image_size, **overrides))
    loaded = load_pretrained(name)
    model, class_names = loaded.model, loaded.class_names
    if overrides:
        fresh = accelerate(build_model(replace_checked(model.cfg, **overrides)))
        load_state_dict_checked(fresh, model.state_dict(), source=name)
        model = fresh.eval()
    if num_classes is not None and num_classes != model.cfg.num_classes:
        model.reset_head(num_classes)
        class_names = None
    if image_size is not None:
        model.set_image_size(image_size)
        loaded.meta["preprocess"]["image_size"] = _square(image_size)
    model.pretrained_cfg = {**loaded.meta, "class_names": class_names}
    return model


def transform_for(model: nn.Module | LoadedModel) -> Preprocess:
    """The eval transform (PIL image -> normalised (3, S, S)) matching a model's pretrained preprocessing."""
    if isinstance(model, LoadedModel):
        return model.preprocess
    return LoadedModel(model, meta=getattr(model, "pretrained_cfg", None) or {}).preprocess


def import_file(src: str | os.PathLike, name: str) -> Path:
    """Put a file carried by hand (a folder for Hugging Face entries) into the cache as ``name``.

    It must load as that model (every key and shape, the classes and resolution) and match the
    catalog's sha256 and size where it has them; the cache then records its sha256.
    """
    src = Path(src)
    if name == augreg.INDEX_NAME:  # the AugReg index itself, for `hub list --augreg` offline
        return cache.import_into(src, cache.cache_path("gcs", augreg.INDEX_PATH))
    entry = entry_for(name)
    if entry.kind == "package":
        raise ValueError(f"{entry.name} ships inside vitlab; there is nothing to import")
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    load_entry(entry, src)
    if entry.kind == "hf":
        return hf.import_repo(src, entry.source["hf"], entry.source.get("revision", "main"), sha256=entry.sha256)
    return cache.import_into(src, cache.cache_path("gcs", entry.source["gcs"]), sha256=entry.sha256, size=entry.size)
