"""Map-style datasets: decoded arrays held in memory, and image folders streamed from disk."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .images import is_image_file, load_image


@dataclass
class ArrayDataset(Dataset):
    """A small set decoded once: uint8 images (N, 3, H, W) and int64 labels (N,)."""

    images: Tensor
    labels: Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])

    def subset(self, indices: Tensor) -> ArrayDataset:
        return ArrayDataset(self.images[indices], self.labels[indices], self.class_names)


@dataclass
class ImageFolderDataset(Dataset):
    """``(path, label)`` samples read lazily; ``__getitem__`` raises ValueError for a bad file."""

    samples: list[tuple[str, int]]
    class_names: list[str]
    labels: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return load_image(path), label

    def subset(self, indices: Tensor) -> ImageFolderDataset:
        return ImageFolderDataset([self.samples[i] for i in indices.tolist()], self.class_names)


@dataclass
class FolderScan:
    """Image files per class of one ``root/<class>/...`` tree, the non-image files ignored, and the
    symbolic links not followed (cycles, links into another class, a second path to one folder)."""

    root: Path
    files: dict[str, list[str]]  # class name -> sorted image paths
    ignored: list[str]
    links: list[str] = field(default_factory=list)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def scan_class_folders(root: Path) -> FolderScan:
    """List ``root/<class>/**`` image files; an empty class folder is a ValueError.

    Links are followed, but each real folder once, never back up the tree (a cycle) and never
    into another class's folder (its images would get this class's label).
    """
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders; expected {root}/<class>/<image> "
                         f"(or {root}/train/<class>/<image>)")
    real = {name: os.path.realpath(root / name) for name in classes}
    files: dict[str, list[str]] = {}
    ignored: list[str] = []
    links: list[str] = []
    visited: set[str] = set()

    def foreign(path: str, name: str) -> bool:
        """A real path that is not this class's to take: another class's, or above this class folder."""
        mine = real[name]
        return (not _inside(path, mine) and any(_inside(path, r) for c, r in real.items() if c != name)) or \
            (path != mine and _inside(mine, path))

    for name in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            here = os.path.realpath(dirpath)
            if here in visited or foreign(here, name):
                links.append(dirpath)
                dirnames[:] = []
                continue
            visited.add(here)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                path = os.path.join(dirpath, f)
                if os.path.islink(path) and foreign(os.path.realpath(path), name):
                    links.append(path)
                    continue
                (found if is_image_file(f) else ignored).append(path)
        if not found:
            raise ValueError(f"class folder {root / name} has no images (JPEG, PNG, WebP or BMP); "
                             f"add images or remove the folder")
        files[name] = found
    return FolderScan(root, files, ignored, links)


def folder_dataset(scan: FolderScan, class_names: list[str]) -> ImageFolderDataset:
    """Samples of ``scan`` labelled by position in ``class_names`` (the training classes)."""
    missing = [c for c in class_names if c not in scan.files]
    extra = [c for c in scan.files if c not in class_names]
    if missing:
        raise ValueError(f"{scan.root} has no folder for class(es) {missing} present in training; "
                         f"every training class needs images in each split")
    if extra:
        raise ValueError(f"{scan.root} has class folder(s) {extra} that training does not have; "
                         f"rename or remove them")
    samples = [(p, class_names.index(c)) for c in class_names for p in scan.files[c]]
    return ImageFolderDataset(samples, class_names)


def stratified_split(labels: Tensor, fraction: float, seed: int,
                     class_names: list[str]) -> tuple[Tensor, Tensor]:
    """Seeded per-class split of indices into (train, val), about ``fraction`` of each class in val."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in range(len(class_names)):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = max(1, round(len(idx) * fraction))
        if len(idx) - n_val < 1:
            raise ValueError(f"class {class_names[c]!r} has {len(idx)} image(s): too few to hold out "
                             f"a val_split of {fraction}; add images or lower --val-split")
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values
