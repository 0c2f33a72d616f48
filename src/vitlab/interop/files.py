"""Reading and writing foreign weight files safely: never unpickle code.

``.npz`` through ``numpy.load(allow_pickle=False)``, ``.safetensors`` through safetensors,
``.pth``/``.pt``/``.bin`` through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint import atomic_write, read_safetensors

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All arrays of an ``.npz`` file as tensors (object arrays are refused, not unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.ascontiguousarray(npz[k])) for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz file of plain arrays ({err})") from err


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); is it corrupted or truncated?") from err


def write_npz(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically write tensors to an uncompressed ``.npz`` (keys as given, e.g. ``Transformer/...``)."""
    arrays = {k: v.detach().cpu().numpy() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
    return atomic_write(path, write)


def _unwrap(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict, possibly inside ``{"model": ...}`` or ``{"state_dict": ...}`` (training checkpoints)."""
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def read_torch_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or from a pickle read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"refused to load {path}: it is not a plain tensor checkpoint and vitlab never executes pickled code "
            f"(torch.load weights_only=True said: {first}); re-save it as safetensors from code you trust"
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read {path} ({err}); is it corrupted or truncated?") from err
    return _unwrap(obj, path)


def write_torch_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a state dict: ``.safetensors``, or a torch pickle of tensors for ``.pth``/``.pt``/``.bin``."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    if path.suffix in TORCH_SUFFIXES:
        return atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    raise ValueError(f"unknown weights suffix {path.suffix!r} for {path}; use .safetensors or .pth")


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; a broken file is a ``ValueError`` naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data
