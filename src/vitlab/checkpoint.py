"""Checkpoints: atomic writes, self-describing safetensors files, safe loading.

A model file is ``model.safetensors`` whose metadata holds the config (``config_type`` +
``config`` as JSON), the class names and anything else recorded. Loading never unpickles:
safetensors for weights, ``torch.load(weights_only=True)`` for training state.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open
from torch import nn

from .config import as_pair, from_dict, to_dict
from .accel import accelerate
from .models import build_model, config_type

MODEL_FILE = "model.safetensors"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and safetensors' own temp file) make 0600: the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_section(path: str | os.PathLike, text: str, start: str, end: str, *, title: str = "") -> Path:
    """Replace the part of the markdown file ``path`` from marker ``start`` to ``end`` with ``text``
    (which holds both markers), or append it (to ``title`` in a new file); atomically, the rest kept."""
    path = Path(path)
    old = path.read_text() if path.exists() else title
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + text.rstrip("\n") + rest.split(end, 1)[1]
    else:
        new = (old.rstrip("\n") + "\n\n" if old else "") + text.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(new))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON."""
    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")
    return atomic_write(path, write)


@dataclass
class LoadedModel:
    """A model with what it needs to be used: class names and input preprocessing."""

    model: nn.Module
    class_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (an exported model runs on the CPU)."""
        return next(self.model.parameters(), torch.empty(0)).device

    @property
    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        """The model's eval transform: PIL image -> resized, centre-cropped, normalised (3, S, S).

        A released model's own preprocessing (``meta["preprocess"]``: crop fraction, interpolation)
        when it has one, else a resize + centre crop at its size with its mean and std.
        """
        from .data.images import Preprocess  # data imports torchvision; only load it when asked

        if "preprocess" in self.meta:
            p = self.meta["preprocess"]
            return Preprocess(**{**p, "mean": tuple(p["mean"]), "std": tuple(p["std"])})
        h, w = as_pair(self.config.image_size)
        if h != w:
            raise ValueError(f"preprocess needs a square input size; the model takes {h}x{w}")
        return Preprocess(image_size=h, mean=tuple(self.config.mean), std=tuple(self.config.std))


def model_metadata(cfg: Any, class_names: list[str] | None = None, meta: dict[str, Any] | None = None
                   ) -> dict[str, str]:
    """What a model file carries besides its weights (string values): the config, class names, metadata.
    Exported files (ONNX, OpenVINO) carry the same dictionary."""
    return {"format": "vitlab", "config_type": type(cfg).__name__, "config": json.dumps(to_dict(cfg)),
            "class_names": json.dumps(class_names), "meta": json.dumps(meta or {})}


def parse_metadata(file: str | os.PathLike, metadata: dict[str, str]) -> tuple[Any, list[str] | None, dict[str, Any]]:
    """``model_metadata`` read back and checked: (config, class names, metadata); errors name ``file``."""
    if metadata.get("format") != "vitlab":
        raise ValueError(f"{file} is not a vitlab model file (no vitlab metadata); convert it with `vitlab convert`")
    if "config_type" not in metadata:
        raise ValueError(f"{file} has no 'config_type' in its metadata; it is damaged: convert or save it again")
    fields = _metadata_json(file, metadata, "config")
    try:
        cfg = from_dict(config_type(metadata["config_type"]), fields)
        with torch.device("meta"):
            build_model(cfg)  # the config describes a model (shapes only, nothing allocated)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{file}: metadata field 'config' does not describe a model ({type(err).__name__}: "
                         f"{err})") from None
    class_names = _metadata_json(file, metadata, "class_names", "null")
    if class_names is not None and (not isinstance(class_names, list) or len(class_names) != cfg.num_classes
                                    or not all(isinstance(c, str) for c in class_names)):
        raise ValueError(f"{file}: metadata field 'class_names' must list {cfg.num_classes} names for the model's "
                         f"{cfg.num_classes}-way head")
    return cfg, class_names, _metadata_json(file, metadata, "meta", "{}")


def save_model(model: nn.Module, path: str | os.PathLike, *, class_names: list[str] | None = None,
               meta: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write ``model`` (weights + config + class names) to one safetensors file.

    ``state_dict`` replaces ``model.state_dict()``: the gathered weights of a sharded model.
    """
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = model_metadata(model.cfg, class_names, meta)
    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as err:  # safetensors reports a full disk as its own error: make it an OSError
            code = re.search(r"os error (\d+)", str(err))
            raise OSError(int(code.group(1)) if code else errno.EIO, os.strerror(int(code.group(1))) if code
                          else str(err), str(path)) from None
    return atomic_write(path, write)


def resolve_model_file(path: str | os.PathLike) -> Path:
    """A run directory or a file -> the model file; a wrong path names what was looked for."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", MODEL_FILE, "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no model file in {path} (looked for best.safetensors, {MODEL_FILE}, last.safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a corrupt file is a ``ValueError``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); is it corrupted or truncated?") from err


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """``load_state_dict`` with an error that names the first mismatching key and both shapes."""
    check_fits(model, state, source=source)
    model.load_state_dict(state)


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Every key of ``model`` in ``state`` with its shape, and nothing else (works on the meta device)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"{source} does not fit this model: {key} has shape {tuple(value.shape)} in the {source} "
                f"but {tuple(own[key].shape)} in the model; is it a checkpoint of another architecture?"
            )
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit this model: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def _metadata_json(file: Path, metadata: dict[str, str], key: str, default: str | None = None) -> Any:
    """One JSON field of a model file's metadata; a missing or unreadable one names the file and field."""
    if key not in metadata and default is None:
        raise ValueError(f"{file} has no {key!r} in its metadata; is it a vitlab model file? (`vitlab convert`)")
    try:
        return json.loads(metadata.get(key, default))
    except ValueError as err:
        raise ValueError(f"{file}: metadata field {key!r} is not valid JSON ({err})") from None


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load a vitlab model file or run directory: model (eval mode), class names, metadata.

    The declared architecture is built on the meta device and checked against the file's tensors
    before anything is allocated, so a small file cannot make it build a giant model.
    """
    file = resolve_model_file(path)
    state, metadata = read_safetensors(file)
    cfg, class_names, meta = parse_metadata(file, metadata)
    with torch.device("meta"):
        check_fits(build_model(cfg), state, source=str(file))  # shapes only: nothing allocated yet
    model = accelerate(build_model(cfg))
    load_state_dict_checked(model, state, source=str(file))
    model.to(map_location).eval()
    return LoadedModel(model, class_names, meta)


def save_state(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write a training state (tensors and plain Python values) with ``torch.save``."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state safely (``weights_only=True``); a corrupt file is a ``ValueError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises several types for bad files
        raise ValueError(f"cannot read training state {path}: {err}") from err
