"""CIFAR-10 / CIFAR-100 in the official binary and python layouts (no pickled code ever runs).

Binary: records of label byte(s) + 3,072 pixel bytes (1,024 R, G, B, row-major); CIFAR-10 has
one label byte (``data_batch_{1..5}.bin``, ``test_batch.bin``, ``batches.meta.txt``), CIFAR-100
two, coarse then fine (``train.bin``, ``test.bin``, ``fine_label_names.txt``).
Python: pickled dicts (``data_batch_{1..5}``, ``test_batch``, ``batches.meta`` for CIFAR-10;
``train``, ``test``, ``meta`` for CIFAR-100) read with ``RestrictedUnpickler``.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import ArrayDataset

RECORD_PIXELS = 3 * 32 * 32

# Which layout a directory holds, told by the files it must contain.
LAYOUTS = {
    "cifar10-binary": [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"],
    "cifar100-binary": ["train.bin", "test.bin"],
    "cifar10-python": [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
    "cifar100-python": ["train", "test", "meta"],
}
# The folder names of the official archives, for a path that holds one of them.
FOLDERS = ("cifar-10-batches-bin", "cifar-100-binary", "cifar-10-batches-py", "cifar-100-python")


def detect_layout(root: Path) -> str | None:
    """The CIFAR layout ``root`` holds, or None if it is not a CIFAR directory."""
    for layout, names in LAYOUTS.items():
        if all((root / n).is_file() for n in names):
            return layout
    for layout, names in LAYOUTS.items():  # partly there: say what is missing
        if (root / names[0]).is_file():
            missing = [n for n in names if not (root / n).is_file()]
            raise ValueError(f"{root} looks like {layout} but lacks {missing}; re-extract the archive")
    return None


def read_binary(files: list[Path], label_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Records of ``files`` -> uint8 images (N, 3, 32, 32), int64 labels (N,) (the last label byte)."""
    record = label_bytes + RECORD_PIXELS
    images, labels = [], []
    for f in files:
        raw = np.fromfile(f, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise ValueError(f"{f} is {raw.size} bytes, not a whole number of {record}-byte CIFAR "
                             f"records: the file is truncated or not CIFAR; re-extract the archive")
        raw = raw.reshape(-1, record)
        labels.append(raw[:, label_bytes - 1].astype(np.int64))
        images.append(raw[:, label_bytes:].reshape(-1, 3, 32, 32))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only numpy arrays and dtypes (plus builtin containers, which need no lookup)."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays "
                                         f"and builtin containers are allowed in CIFAR files")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR python-layout file as a dict with str keys; ValueError if it is not one."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"cannot read CIFAR pickle {path}: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a CIFAR dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _python_split(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = read_pickle(path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path} lacks 'data' or {label_key!r}; is it a CIFAR python-layout file?")
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != RECORD_PIXELS:
        raise ValueError(f"{path}: 'data' has shape {data.shape}, expected (N, {RECORD_PIXELS})")
    labels = np.asarray(d[label_key], dtype=np.int64)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _names(values: list[Any]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_cifar(root: Path, layout: str) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) of the CIFAR directory ``root`` in ``layout`` (see ``LAYOUTS``)."""
    if layout == "cifar10-binary":
        meta = root / "batches.meta.txt"
        names = [s.strip() for s in meta.read_text().splitlines() if s.strip()] if meta.exists() else []
        train = read_binary([root / f"data_batch_{i}.bin" for i in range(1, 6)], 1)
        test = read_binary([root / "test_batch.bin"], 1)
        num_classes = 10
    elif layout == "cifar100-binary":
        meta = root / "fine_label_names.txt"
        names = [s.strip() for s in meta.read_text().splitlines() if s.strip()] if meta.exists() else []
        train = read_binary([root / "train.bin"], 2)
        test = read_binary([root / "test.bin"], 2)
        num_classes = 100
    elif layout == "cifar10-python":
        parts = [_python_split(root / f"data_batch_{i}", "labels") for i in range(1, 6)]
        train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        test = _python_split(root / "test_batch", "labels")
        meta = root / "batches.meta"
        names = _names(read_pickle(meta).get("label_names", [])) if meta.exists() else []
        num_classes = 10
    elif layout == "cifar100-python":
        train = _python_split(root / "train", "fine_labels")
        test = _python_split(root / "test", "fine_labels")
        names = _names(read_pickle(root / "meta").get("fine_label_names", []))
        num_classes = 100
    else:
        raise ValueError(f"unknown CIFAR layout {layout!r}; valid: {sorted(LAYOUTS)}")
    names = names or [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{root}: {len(names)} class names for {num_classes} classes")
    for split, (_, labels) in (("train", train), ("test", test)):
        if labels.numel() and int(labels.max()) >= num_classes:
            raise ValueError(f"{root}: {split} label {int(labels.max())} is out of range for "
                             f"{num_classes} classes; is this {layout}?")
    return ArrayDataset(*train, names), ArrayDataset(*test, names)
