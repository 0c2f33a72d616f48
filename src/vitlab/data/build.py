"""``build_data``: detect the format at a path, read or index it, split it, validate it."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from .cifar import FOLDERS, detect_layout, read_cifar
from .config import DataConfig
from .datasets import (CLASS_LIST, FolderScan, balanced_subset, folder_dataset, keep_classes, read_class_list,
                       scan_class_folders, stratified_split)
from .download import CIFAR_ARCHIVES, Archive, ensure_archive

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Data:
    """The splits of one data source. ``val``/``test`` are None where the source has none."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    class_names: list[str]
    source: str = ""  # what was read, e.g. "CIFAR-10 binary at /path"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resolve_path(cfg: DataConfig, *, archives: Mapping[str, Archive] = CIFAR_ARCHIVES,
                 log: Callable[[str], None] = print) -> Path:
    """The directory ``cfg.path`` names: an existing path, or a cached/downloaded CIFAR archive."""
    root = Path(cfg.path).expanduser()
    if not root.exists() and cfg.path in archives:
        return ensure_archive(cfg.path, cfg.cache_dir, archives=archives, log=log)
    if not root.exists():
        raise FileNotFoundError(
            f"data path {cfg.path!r} does not exist; pass a CIFAR folder (e.g. cifar-10-batches-bin), "
            f"an image folder (root/train/<class>/..., or root/<class>/... with --val-split), "
            f"or {' / '.join(sorted(archives))} to download")
    if not root.is_dir():
        raise ValueError(f"data path {root} is a file; pass the folder that holds the data")
    inner = [root / f for f in FOLDERS if (root / f).is_dir()]
    return inner[0] if len(inner) == 1 and detect_layout(root) is None else root


def build_data(cfg: DataConfig, *, archives: Mapping[str, Archive] = CIFAR_ARCHIVES,
               log: Callable[[str], None] = print) -> Data:
    """Read the data ``cfg.path`` names and split it; a clear ValueError for unusable data."""
    root = resolve_path(cfg, archives=archives, log=log)
    layout = detect_layout(root)
    if layout is not None:
        train, test = read_cifar(root, layout)
        names = train.class_names
        source = f"{layout} at {root}"
        val = None
    else:
        train, val, test, names, source = _folder_splits(root, log)
    if cfg.classes:
        train, val, test, names = _keep_classes(cfg.classes, train, val, test, names, source, log)
    if cfg.train_subset:
        if cfg.train_subset > len(train):
            raise ValueError(f"train_subset {cfg.train_subset} is larger than the training set ({len(train)} images"
                             f"{' of the kept classes' if cfg.classes else ''}); use at most {len(train)} (0: all)")
        full = len(train)
        train = train.subset(balanced_subset(train.labels, cfg.train_subset, cfg.seed, names))
        log(f"train_subset {cfg.train_subset}: {cfg.train_subset // len(names)} images of each class, "
            f"{len(train)} of {full} (seed {cfg.seed})")
    if cfg.val_split > 0:
        train_idx, val_idx = stratified_split(train.labels, cfg.val_split, cfg.seed, names)
        if val is not None and test is val:
            log(f"val_split={cfg.val_split}: val is held out from train; {root / 'val'} serves as test")
        elif val is not None:
            log(f"val_split={cfg.val_split}: val is held out from train; {root / 'val'} is not used")
        train, val = train.subset(train_idx), train.subset(val_idx)
    splits = (("train", train), ("val", val), ("test", test))
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits if v is not None)
    log(f"data: {source}: {len(names)} classes, {sizes}")
    return Data(train, val, test, names, source)


def _keep_classes(classes: tuple[int, ...], train, val, test, names: list[str], source: str,
                  log: Callable[[str], None]):
    """The splits restricted to ``classes`` (indices of ``names``), relabelled 0..k-1 in that order."""
    bad = [c for c in classes if c >= len(names)]
    if bad:
        raise ValueError(f"classes {bad} out of range: {source} has {len(names)} classes, indices 0-{len(names) - 1} "
                         f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
    kept = [keep_classes(ds, classes) if ds is not None else None for ds in (train, val)]
    test = kept[1] if test is val and test is not None else keep_classes(test, classes) if test is not None else None
    kept_names = [names[c] for c in classes]
    log(f"classes {', '.join(map(str, classes))} of {len(names)} ({', '.join(kept_names)}), relabelled "
        f"0-{len(classes) - 1}")
    return kept[0], kept[1], test, kept_names


def _folder_splits(root: Path, log: Callable[[str], None]):
    """Image folder: ``root/train`` (+ ``val``/``test``) or a single ``root/<class>`` tree; the
    classes are ``root/classes.txt``'s when it exists, else the training split's folders."""
    listed = read_class_list(root)
    listed_in = root / CLASS_LIST if listed else None
    if (root / "train").is_dir():
        scans = {s: scan_class_folders(root / s) for s in SPLIT_NAMES if (root / s).is_dir()}
        names = listed or list(scans["train"].files)
        splits = {s: folder_dataset(scan, names, listed_in=listed_in) for s, scan in scans.items()}
        val = splits.get("val")
        test = splits.get("test", val)
        source = f"image folder {root} ({', '.join(scans)})"
    elif any(p.is_dir() for p in root.iterdir()):
        scans = {"train": scan_class_folders(root)}
        names = listed or list(scans["train"].files)
        splits = {"train": folder_dataset(scans["train"], names, listed_in=listed_in)}
        val = test = None
        source = f"image folder {root}"
    else:
        raise ValueError(f"no images found at {root}: expected CIFAR files, {root}/train/<class>/<image>, "
                         f"or {root}/<class>/<image>")
    _report_ignored(scans, log)
    return splits["train"], val, test, names, source


def _report_ignored(scans: dict[str, FolderScan], log: Callable[[str], None]) -> None:
    links = [p for scan in scans.values() for p in scan.links]
    if links:
        log(f"did not follow {len(links)} link(s) that loop back, lead into another class's folder or repeat a "
            f"folder, e.g. {', '.join(map(ascii, links[:3]))}")
    ignored = [p for scan in scans.values() for p in scan.ignored]
    if ignored:
        first = ", ".join(ignored[:3])
        log(f"skipped {len(ignored)} non-image file(s) (not JPEG/PNG/WebP/BMP), e.g. {first}")
