"""Predict classes for image files with a trained model: top-k labels with probabilities."""
from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from .checkpoint import LoadedModel
from .data import load_image
from .data.images import find_images


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first."""

    path: str
    labels: list[str]
    probs: list[float]


def image_files(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], bool]:
    """Files to predict (folders searched recursively, sorted) and whether any folder was given."""
    paths = list(paths)
    return find_images(paths), any(Path(p).is_dir() for p in paths)


@torch.no_grad()
def predict(loaded: LoadedModel, files: list[Path], *, top_k: int = 5, batch_size: int = 64,
            skip_unreadable: bool = False, log: Callable[[str], None] = print) -> list[Prediction]:
    """Top-``top_k`` predictions for each file; an unreadable file is an error, or skipped and logged."""
    model = loaded.model.eval()
    device = loaded.device
    names = loaded.class_names or [str(i) for i in range(model.cfg.num_classes)]
    k = min(top_k, len(names))
    preprocess = loaded.preprocess
    out: list[Prediction] = []
    for start in range(0, len(files), batch_size):
        kept, images = [], []
        for f in files[start:start + batch_size]:
            try:
                images.append(preprocess(load_image(f)))
                kept.append(f)
            except ValueError as err:
                if not skip_unreadable:
                    raise
                log(f"skipping {err}")
        if not images:
            continue
        probs = model(torch.stack(images).to(device)).float().softmax(dim=1)  # (B, classes)
        top = probs.topk(k, dim=1)
        for f, p, i in zip(kept, top.values.tolist(), top.indices.tolist()):
            out.append(Prediction(str(f), [names[j] for j in i], p))
    return out


def write_csv(predictions: list[Prediction], out: TextIO) -> None:
    """One row per image: path, then label_1, prob_1 ... label_k, prob_k."""
    k = max((len(p.labels) for p in predictions), default=0)
    writer = csv.writer(out)
    writer.writerow(["path"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")])
    for p in predictions:
        writer.writerow([p.path] + [c for label, prob in zip(p.labels, p.probs) for c in (label, f"{prob:.6f}")])
