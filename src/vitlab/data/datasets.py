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


CLASS_LIST = "classes.txt"  # an image folder's own list of its classes, one folder name a line


def read_class_list(root: Path) -> list[str] | None:
    """The classes ``root/classes.txt`` lists, in its order (None without the file)."""
    path = root / CLASS_LIST
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if len(names) < 2 or repeated:
        raise ValueError(f"{path} must list at least two class folder names, each once (one a line)"
                         + (f"; repeated: {repeated[:5]}" if repeated else ""))
    return names


def folder_dataset(scan: FolderScan, class_names: list[str], *, listed_in: Path | None = None) -> ImageFolderDataset:
    """Samples of ``scan`` labelled by position in ``class_names``: the training classes, or those the
    ``listed_in`` file (``classes.txt``) lists, which a split may have no images of."""
    missing = [c for c in class_names if c not in scan.files]
    extra = [c for c in scan.files if c not in class_names]
    if missing and listed_in is None:
        raise ValueError(f"{scan.root} has no folder for class(es) {missing} present in training; "
                         f"every training class needs images in each split (or list the classes in "
                         f"{scan.root.parent / CLASS_LIST})")
    if extra:
        known = f"{listed_in} does not list" if listed_in else "training does not have"
        raise ValueError(f"{scan.root} has class folder(s) {extra} that {known}; rename or remove them")
    samples = [(p, class_names.index(c)) for c in class_names for p in scan.files.get(c, [])]
    return ImageFolderDataset(samples, class_names)


def stratified_split(labels: Tensor, fraction: float, seed: int,
                     class_names: list[str]) -> tuple[Tensor, Tensor]:
    """Seeded per-class split of indices into (train, val), about ``fraction`` of each class in val."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in range(len(class_names)):
        idx = (labels == c).nonzero().flatten()
        if len(idx) == 0:  # a class that classes.txt lists and this split has no images of
            continue
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = max(1, round(len(idx) * fraction))
        if len(idx) - n_val < 1:
            raise ValueError(f"class {class_names[c]!r} has {len(idx)} image(s): too few to hold out "
                             f"a val_split of {fraction}; add images or lower --val-split")
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


Labelled = ArrayDataset | ImageFolderDataset  # the datasets with labels and class names


def keep_classes(dataset: Labelled, classes: tuple[int, ...]) -> Labelled:
    """The samples of ``classes`` (indices into ``dataset.class_names``), relabelled 0..k-1 in that order."""
    mapping = torch.full((len(dataset.class_names),), -1, dtype=torch.int64)
    mapping[list(classes)] = torch.arange(len(classes))
    indices = (mapping[dataset.labels] >= 0).nonzero().flatten()
    labels = mapping[dataset.labels[indices]]
    names = [dataset.class_names[c] for c in classes]
    if isinstance(dataset, ArrayDataset):
        return ArrayDataset(dataset.images[indices], labels, names)
    return ImageFolderDataset([(dataset.samples[i][0], int(y)) for i, y in zip(indices.tolist(), labels.tolist())],
                              names)


def balanced_subset(labels: Tensor, size: int, seed: int, class_names: list[str]) -> Tensor:
    """Sorted indices of ``size // len(class_names)`` seeded random examples of each class. For one seed
    the subsets are nested: a larger ``size`` keeps every example a smaller one keeps."""
    k = len(class_names)
    if size % k:
        lower = size // k * k
        raise ValueError(f"train_subset {size} does not divide evenly into the {k} classes; use a multiple of {k} "
                         f"(e.g. {lower or k} or {lower + k})")
    per_class = size // k
    counts = torch.bincount(labels, minlength=k)[:k].tolist()
    fewest = min(range(k), key=counts.__getitem__)
    if counts[fewest] < per_class:
        raise ValueError(f"train_subset {size} needs {per_class} training images of each class, but class "
                         f"{class_names[fewest]!r} has {counts[fewest]}; use at most {counts[fewest] * k}")
    g = torch.Generator().manual_seed(seed)
    kept = [(labels == c).nonzero().flatten() for c in range(k)]
    kept = [idx[torch.randperm(len(idx), generator=g)[:per_class]] for idx in kept]
    return torch.cat(kept).sort().values
