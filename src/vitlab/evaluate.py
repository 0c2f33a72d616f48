"""Classification metrics: top-1, top-5, per-class accuracy and the confusion matrix."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import LoadedModel
from .config import as_pair
from .data import DataConfig, Loader, build_data
from .distributed import DistEnv, autocast, even_batches, resolve_device, sum_across_ranks
from .hub import is_pretrained_name, load_model
from .run import CONFIG_FILE, load_run_config


@dataclass
class EvalResult:
    """Metrics over a labelled set; ``confusion[i, j]`` counts images of class i predicted as j."""

    num_images: int
    loss: float  # mean cross-entropy
    top1: float  # fractions in [0, 1]
    top5: float
    confusion: torch.Tensor  # int64 (classes, classes)
    class_names: list[str]

    @property
    def per_class(self) -> list[float | None]:
        """Accuracy of each class (None for a class with no images)."""
        counts = self.confusion.sum(1)
        return [None if n == 0 else float(self.confusion[i, i]) / float(n) for i, n in enumerate(counts.tolist())]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the numbers, per-class accuracy by name, and the confusion matrix."""
        return {
            "num_images": self.num_images, "loss": self.loss, "top1": self.top1, "top5": self.top5,
            "per_class": dict(zip(self.class_names, self.per_class)),
            "class_names": self.class_names, "confusion": self.confusion.tolist(),
        }


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | Any, *,
             class_names: list[str], device: str | torch.device = "cpu", precision: str = "fp32",
             progress: bool = False, env: DistEnv | None = None, flip_tta: bool = False) -> EvalResult:
    """Run ``model`` over labelled batches (a ``Loader`` or any iterable of (images, int64 labels)).

    The model is put in eval mode and left there. ``precision="bf16"`` evaluates under autocast.
    ``flip_tta``: test-time augmentation, the logits of each image and its mirror image averaged
    (two forward passes; for models trained with horizontal flips).
    With ``env``, every process passes its own share (a Loader built with its rank) and all
    get the totals over all shares.
    """
    device = torch.device(device)
    iterable = batches.epoch(0) if hasattr(batches, "epoch") else batches
    total = len(batches) if hasattr(batches, "__len__") else None
    if env is not None and env.distributed:  # as many forwards everywhere: a sharded model keeps pace
        iterable = even_batches(iterable, len(batches), env)
    k = len(class_names)
    confusion = torch.zeros(k, k, dtype=torch.int64)
    loss_sum, top5_hits, n = 0.0, 0, 0
    model.eval()
    for x, y in tqdm(iterable, total=total, desc="evaluating", leave=False, disable=not progress):
        x, y = x.to(device), y.to(device)
        if y.ndim != 1:
            raise ValueError(f"evaluation needs class-index labels (B,), got shape {tuple(y.shape)}")
        with autocast(device, precision):
            logits = model(x).float()  # (B, classes)
            if flip_tta:
                logits = (logits + model(x.flip(-1)).float()) / 2
        if logits.shape[1] != k:
            raise ValueError(f"the model predicts {logits.shape[1]} classes but the data has {k}")
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, k), dim=1).indices  # (B, 5)
        top5_hits += (top == y[:, None]).any(1).sum().item()
        confusion += torch.bincount((y * k + top[:, 0]).cpu(), minlength=k * k).view(k, k)
        n += len(y)
    if env is not None:  # the shares are disjoint: each image counted once
        confusion = sum_across_ranks(confusion, env).long()
        loss_sum, top5_hits, n = sum_across_ranks([loss_sum, top5_hits, n], env).tolist()
        n = int(n)
    if n == 0:
        raise ValueError("nothing to evaluate: the evaluation set is empty")
    return EvalResult(n, loss_sum / n, confusion.diagonal().sum().item() / n, top5_hits / n, confusion, class_names)


def evaluate_checkpoint(checkpoint: str | os.PathLike, *, data: str | None = None, split: str | None = None,
                        batch_size: int = 256, device: str = "auto", precision: str = "fp32",
                        progress: bool = False, flip_tta: bool = False, runtime: str | None = None,
                        log: Callable[[str], None] = print) -> tuple[EvalResult, str]:
    """Evaluate a model file or run directory on a split of ``data``; returns (result, split used).

    For a run directory, ``data`` defaults to the run's data and the run's ``val_split`` and
    seed are reused, so ``val`` is the same held-out set as in training. ``split``: ``test``
    (the default when there is one), ``val`` or ``train``. An exported model (``.onnx``, ``.xml``)
    runs on its runtime (``runtime`` forces one; see ``vitlab.deploy``).
    """
    named = isinstance(checkpoint, str) and not Path(checkpoint).exists() and is_pretrained_name(checkpoint)
    if not named and not Path(checkpoint).exists():
        raise FileNotFoundError(f"{checkpoint} does not exist: pass a run directory, a model file or --model NAME")
    run_cfg = load_run_config(checkpoint) if (Path(checkpoint) / CONFIG_FILE).is_file() else None
    if data is None and run_cfg is None:
        what = "a released model" if named else "a model file, not a run directory"
        raise ValueError(f"{checkpoint} is {what}; pass --data PATH")
    dev = resolve_device(device)
    loaded = load_model(checkpoint, map_location=dev, runtime=runtime, precision=precision)
    loader, split, class_names = split_loader(loaded, data, split, base=run_cfg.data_config() if run_cfg else None,
                                              batch_size=batch_size, log=log)
    result = evaluate(loaded.model, loader, class_names=class_names, device=dev, precision=precision,
                      progress=progress, flip_tta=flip_tta)
    return result, split


def split_loader(loaded: LoadedModel, data: str | None, split: str | None = None, *, base: DataConfig | None = None,
                 batch_size: int = 256, log: Callable[[str], None] = print) -> tuple[Loader, str, list[str]]:
    """An evaluation loader over ``split`` of ``data`` (default: test, else val) preprocessed for
    ``loaded`` (its size, mean and std; ``base``: a run's data settings); returns it, the split and
    the data's class names, checked against the model's."""
    mcfg = loaded.config
    size = as_pair(mcfg.image_size)
    base = base or DataConfig()
    data_cfg = dataclasses.replace(base, path=data or base.path, image_size=size[0],
                                   mean=tuple(mcfg.mean), std=tuple(mcfg.std))
    splits = build_data(data_cfg, log=log)
    if loaded.class_names is not None and loaded.class_names != splits.class_names:
        raise ValueError(f"the checkpoint's classes {loaded.class_names[:5]}... differ from the data's "
                         f"{splits.class_names[:5]}...; evaluate on the data the model was trained for")
    available = {name: ds for name, ds in (("test", splits.test), ("val", splits.val), ("train", splits.train))
                 if ds is not None}
    if split is None and "train" == next(iter(available)):
        raise ValueError(f"{data_cfg.path} has no test or val split; pass --split train to score the training "
                         f"images (that is not a held-out accuracy)")
    split = split or next(iter(available))
    if split == "train":
        log(f"scoring the TRAIN split of {data_cfg.path}: the model has seen these images, this is not a "
            f"held-out accuracy")
    if split not in available:
        raise ValueError(f"{data_cfg.path} has no {split!r} split; available: {', '.join(available)}")
    loader = Loader(available[split], data_cfg, batch_size=batch_size, train=False,
                    num_classes=splits.num_classes, log=log)
    return loader, split, splits.class_names
