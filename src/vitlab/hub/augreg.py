"""The AugReg release (Steiner et al. 2021): the official ``index.csv`` of every upstream and adapted file.

``index.csv`` (``gs://vit_models/augreg/index.csv``) has one row per adapted checkpoint: the
upstream run (name, ds, epochs, lr, aug, wd, do, sd, best_val, final_val, final_test, filename)
and its adaptation (adapt_ds, adapt_lr, adapt_steps, adapt_resolution, adapt_final_val,
adapt_final_test, adapt_filename). ``pick`` selects as the official colab does: per model, the
upstream checkpoint with the best final validation accuracy; then, per downstream data set and
resolution, the adaptation with the best validation accuracy. Any row's file loads by name as
``augreg:<filename>`` (an upstream checkpoint) or ``augreg:<adapt_filename>``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..data.images import Preprocess
from . import cache
from .catalog import Pretrained

INDEX_PATH = "vit_models/augreg/index.csv"
PREFIX = "augreg:"
INDEX_NAME = "augreg:index.csv"  # `vitlab hub import index.csv --name augreg:index.csv`
# index.csv's model names -> vitlab presets.
PRESETS = {"Ti/16": "vit_ti16", "S/16": "vit_s16", "S/32": "vit_s32", "B/16": "vit_b16", "B/32": "vit_b32",
           "B/8": "vit_b8", "L/16": "vit_l16", "R+Ti/16": "r_vit_ti16", "R26+S/32": "r26_vit_s32",
           "R50+L/32": "r50_vit_l32"}
UPSTREAM = {"i21k": ("imagenet21k", 21843), "i1k": ("imagenet1k", 1000)}
DOWNSTREAM = {"imagenet2012": ("imagenet1k", 1000), "cifar100": ("cifar100", 100), "cifar10": ("cifar10", 10),
              "oxford_iiit_pet": ("oxford_iiit_pet", 37), "oxford_flowers102": ("oxford_flowers102", 102),
              "resisc45": (None, 45), "kitti_distance": (None, 4)}
FLOATS = ("lr", "wd", "do", "sd", "best_val", "final_val", "final_test", "adapt_lr", "adapt_final_val",
          "adapt_final_test")


def read_index(*, progress: bool = True) -> list[dict[str, Any]]:
    """The rows of ``index.csv`` (downloaded into the cache once), numbers as numbers."""
    path = cache.fetch(cache.gcs_url(INDEX_PATH), cache.cache_path("gcs", INDEX_PATH), progress=progress,
                       name=INDEX_NAME)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for k in FLOATS:
            if row.get(k) not in (None, ""):
                row[k] = float(row[k])
        for k in ("adapt_resolution", "adapt_steps", "epochs"):
            if row.get(k) not in (None, ""):
                row[k] = int(float(row[k]))
    return rows


def pick(rows: list[dict[str, Any]], *, upstream: str | None = None, downstream: str | None = None,
         resolution: int | None = None, model: str | None = None) -> list[dict[str, Any]]:
    """The colab's choice: best upstream per (model, ds) by ``final_val``; best adaptation per
    (model, ds, adapt_ds, adapt_resolution) by ``adapt_final_val``; filtered by the arguments."""
    rows = [r for r in rows if (upstream is None or r["ds"] == upstream) and (model is None or r["name"] == model)]
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["name"], r["ds"])
        if key not in best or r["final_val"] > best[key]["final_val"]:
            best[key] = r
    chosen = {r["filename"] for r in best.values()}
    adapted: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["filename"] not in chosen:
            continue
        if (downstream and r["adapt_ds"] != downstream) or (resolution and r["adapt_resolution"] != resolution):
            continue
        key = (r["name"], r["ds"], r["adapt_ds"], r["adapt_resolution"])
        if key not in adapted or r["adapt_final_val"] > adapted[key]["adapt_final_val"]:
            adapted[key] = r
    return sorted(adapted.values(), key=lambda r: (r["name"], r["ds"], r["adapt_ds"], r["adapt_resolution"]))


def entry(name: str, *, progress: bool = True) -> Pretrained:
    """A catalog-like entry for ``augreg:<filename>`` or ``augreg:<adapt_filename>`` (looked up in index.csv)."""
    filename = name[len(PREFIX):].removesuffix(".npz")
    for row in read_index(progress=progress):
        if filename in (row["filename"], row["adapt_filename"]):
            break
    else:
        raise ValueError(f"{filename!r} is not a filename or adapt_filename of the AugReg index.csv; see "
                         f"`vitlab hub list --augreg`")
    arch = PRESETS.get(row["name"])
    if arch is None:
        raise ValueError(f"AugReg model {row['name']!r} has no vitlab preset")
    adapted = filename == row["adapt_filename"]
    if adapted:
        labels, classes = DOWNSTREAM.get(row["adapt_ds"], (None, 0))
        size, accuracy = row["adapt_resolution"], {"top1": round(100 * row["adapt_final_test"], 2),
                                                    "data": row["adapt_ds"], "split": "test",
                                                    "source": "AugReg index.csv adapt_final_test"}
    else:
        (labels, classes), size = UPSTREAM.get(row["ds"], (None, 0)), 224
        accuracy = {"top1": round(100 * row["final_test"], 2), "data": row["ds"], "split": "test",
                    "source": "AugReg index.csv final_test"}
    return Pretrained(name=f"{PREFIX}{filename}", architecture=arch,
                      source={"gcs": str(Path(INDEX_PATH).parent / f"{filename}.npz")}, format="official",
                      image_size=size, num_classes=classes, labels=labels,
                      preprocess=Preprocess(image_size=size, crop_pct=1.0, interpolation="bilinear", resize="squash"),
                      license="Apache-2.0", accuracy=accuracy,
                      description=f"AugReg {row['name']} {row['ds']} (aug {row['aug']}, wd {row['wd']:g}, do "
                                  f"{row['do']:g}, sd {row['sd']:g})" + (f", adapted to {row['adapt_ds']} at "
                                                                          f"{size} px" if adapted else ""))
