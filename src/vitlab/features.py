"""Frozen features: a named intermediate of a model, extracted in batches, cached on disk.

``extract_features`` is the one place images go through the frozen model (batched, and split
across ranks under torchrun, by ``vitlab.distributed``); ``cached_features`` keeps what it
computed in a safetensors file per (checkpoint, data, split, feature) and computes only the
rows it has not seen yet.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from .checkpoint import atomic_write, read_safetensors
from .data import DataConfig, Loader
from .distributed import DistEnv
from .distributed import extract_features as gather_features

CACHE_VERSION = 1  # bump when the meaning of a cached feature changes


def as_vectors(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One vector per image: (B, D) as is; token sequences (B, N, D) pooled as the model pools
    its encoder output when they hold its prefix + patch tokens, else averaged; maps averaged."""
    if x.ndim == 2:
        return x
    if x.ndim == 4:
        return x.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(model, "pool") and x.shape[1] == cfg.num_prefix_tokens + cfg.num_patches:
        return model.pool(x)  # (B, prefix + N, D) -> (B, D)
    return x.mean(dim=1)  # (B, N, D) -> (B, D), e.g. the stem's patch tokens


def extract_features(model: nn.Module, dataset: Dataset, data_cfg: DataConfig, *, feature: str = "pre_logits",
                     batch_size: int = 256, device: str | torch.device = "cpu", env: DistEnv | None = None,
                     progress: bool = True, log: Callable[[str], None] = print) -> torch.Tensor:
    """Float32 features ``(len(dataset), D)`` of ``model.features(x)[feature]`` under the eval transform.

    The batches go through ``vitlab.distributed.extract_features``: with a torchrun ``env`` each
    rank computes its share and every rank gets all rows; by default this process on ``device``.
    """
    env = env or DistEnv(device=torch.device(device))
    num_classes = int(dataset.labels.max()) + 1 if len(dataset) else 1  # type: ignore[attr-defined]
    loader = Loader(dataset, data_cfg, batch_size=batch_size, train=False, num_classes=num_classes,
                    rank=env.rank, world_size=env.world_size, log=log)

    def vectors(x: torch.Tensor) -> torch.Tensor:
        named = model.features(x)
        if feature not in named:
            raise ValueError(f"the model has no feature {feature!r}; choose one of {', '.join(named)}")
        return as_vectors(model, named[feature])

    model.eval()
    features, _ = gather_features(vectors, loader, env, progress=progress)
    return features


def cache_key(checkpoint: str | os.PathLike, data_cfg: DataConfig, split: str, feature: str,
              labels: torch.Tensor) -> dict[str, Any]:
    """What cached features depend on: the checkpoint file (path, size, mtime), the data, split, size, feature."""
    file = Path(checkpoint).resolve()
    stat = file.stat()
    data = Path(data_cfg.path).expanduser()
    return {
        "version": CACHE_VERSION,
        "checkpoint": str(file), "checkpoint_size": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns,
        "data": str(data.resolve()) if data.exists() else data_cfg.path, "split": split,
        "image_size": data_cfg.image_size, "mean": list(data_cfg.mean), "std": list(data_cfg.std),
        "feature": feature, "num_examples": len(labels),
        "labels_sha256": hashlib.sha256(labels.to(torch.int64).numpy().tobytes()).hexdigest(),
        # the selection, only when there is one (so caches written before these fields stay valid)
        **({"classes": list(data_cfg.classes)} if data_cfg.classes else {}),
        **({"train_subset": data_cfg.train_subset, "seed": data_cfg.seed} if data_cfg.train_subset else {}),
    }


def cached_features(key: dict[str, Any], cache_dir: str | os.PathLike, indices: torch.Tensor,
                    compute: Callable[[torch.Tensor], torch.Tensor], *,
                    log: Callable[[str], None] = print) -> tuple[torch.Tensor, int]:
    """Features of the examples ``indices`` (in that order) and how many had to be computed.

    The cache file for ``key`` holds sorted example indices and their features; rows it lacks
    are computed with ``compute(missing_indices) -> (M, D)`` and added to it.
    """
    if not len(indices):
        return torch.empty(0, 0), 0
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir).expanduser() / f"{digest}.safetensors"
    known, feats = torch.empty(0, dtype=torch.int64), None
    if path.is_file():
        try:
            tensors, meta = read_safetensors(path)
            if json.loads(meta.get("key", "null")) == key:
                known, feats = tensors["indices"], tensors["features"]
        except (ValueError, KeyError) as err:  # a damaged cache is only a miss
            log(f"ignoring the unreadable feature cache {path} ({err})")
    wanted = indices.unique()  # sorted
    missing = wanted[~torch.isin(wanted, known)]
    if len(missing):
        new = compute(missing)
        known = torch.cat([known, missing])
        feats = new if feats is None else torch.cat([feats, new])
        order = known.argsort()
        known, feats = known[order].contiguous(), feats[order].contiguous()
        tensors = {"indices": known, "features": feats}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"key": json.dumps(key)}))
    return feats[torch.searchsorted(known, indices)], len(missing)
