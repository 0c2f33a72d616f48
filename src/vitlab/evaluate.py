"""Classification metrics: top-1, top-5, per-class accuracy, the confusion matrix, and ImageNet-ReaL top-1.

ReaL (Beyer et al. 2020, google-research/reassessed-imagenet ``real.json``) gives each ImageNet
validation image a list of acceptable labels, in sorted file-name order (``ILSVRC2012_val_00000001.JPEG``
first); an image with an empty list is left out. An image folder's split is read class folder by
class folder, so the labels are matched to its images by sorted file name, not by that order.
"""
from __future__ import annotations

import dataclasses
import json
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
from .data import DataConfig, ImageFolderDataset, Loader, build_data
from .distributed import DistEnv, autocast, even_batches, resolve_device, sum_across_ranks
from .hub import entry_for, is_pretrained_name, load_model, synsets
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
    predictions: torch.Tensor | None = None  # int64 (num_images,): top-1 class per image, in the batches' order
    real: RealResult | None = None  # ImageNet-ReaL top-1, when its labels were given

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
            **({"real": dataclasses.asdict(self.real)} if self.real else {}),
        }


@dataclass
class RealResult:
    """ImageNet-ReaL top-1: a prediction counts when it is one of the image's reassessed labels."""

    top1: float  # a fraction in [0, 1], over the images with at least one ReaL label
    num_images: int  # the images used: those with a ReaL label
    num_skipped: int  # images whose ReaL list is empty (left out)
    labels_file: str


REAL_FIX = ("use google-research/reassessed-imagenet's real.json: a JSON list holding, for each validation "
            "image in sorted file-name order, the list of its acceptable class indices")


def read_real_labels(path: str | os.PathLike, *, num_images: int, num_classes: int) -> list[list[int]]:
    """The ReaL label lists of ``path``, checked: one per image of the split, class indices of the model."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"ReaL labels file {path} does not exist; {REAL_FIX}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not JSON ({str(err).splitlines()[0]}); {REAL_FIX}") from None
    if not isinstance(data, list) or not all(isinstance(labels, list) for labels in data):
        raise ValueError(f"{path} is not a list of label lists; {REAL_FIX}")
    if len(data) != num_images:
        raise ValueError(f"{path} holds labels for {len(data)} images but the evaluated split has {num_images}; "
                         f"evaluate the whole validation folder it was written for (--split, --data)")
    for i, labels in enumerate(data):
        for label in labels:
            if isinstance(label, bool) or not isinstance(label, int):
                raise ValueError(f"{path}: image {i}'s labels hold {label!r}, not a class index; {REAL_FIX}")
            if not 0 <= label < num_classes:
                raise ValueError(f"{path}: image {i}'s labels hold {label}, outside the model's {num_classes} "
                                 f"classes (0-{num_classes - 1}); evaluate the ImageNet-1k model the labels are for")
    return data


def real_order(files: list[str]) -> list[int]:
    """The indices of ``files`` in sorted file-name order (the order of ``real.json``)."""
    names = [os.path.basename(f) for f in files]
    order = sorted(range(len(files)), key=names.__getitem__)
    repeated = [names[a] for a, b in zip(order, order[1:]) if names[a] == names[b]]
    if repeated:
        raise ValueError(f"{len(repeated)} file name(s) occur in more than one class folder (e.g. {repeated[0]}); "
                         f"ReaL labels are matched to images by file name, which must be unique")
    return order


def real_top1(predictions: torch.Tensor, files: list[str], labels: list[list[int]],
              labels_file: str = "") -> RealResult:
    """ReaL top-1 of the top-1 ``predictions`` of ``files`` (same order) against ``labels`` (file-name order)."""
    hits = used = 0
    for rank, i in enumerate(real_order(files)):
        if labels[rank]:
            used += 1
            hits += int(predictions[i]) in labels[rank]
    if used == 0:
        raise ValueError(f"no image has a ReaL label in {labels_file or 'the labels'}; {REAL_FIX}")
    return RealResult(hits / used, used, len(files) - used, labels_file)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | Any, *,
             class_names: list[str], device: str | torch.device = "cpu", precision: str = "fp32",
             progress: bool = False, env: DistEnv | None = None, flip_tta: bool = False,
             keep_predictions: bool = False) -> EvalResult:
    """Run ``model`` over labelled batches (a ``Loader`` or any iterable of (images, int64 labels)).

    The model is put in eval mode and left there. ``precision="bf16"`` evaluates under autocast.
    ``flip_tta``: test-time augmentation, the logits of each image and its mirror image averaged
    (two forward passes; for models trained with horizontal flips).
    With ``env``, every process passes its own share (a Loader built with its rank) and all
    get the totals over all shares. ``keep_predictions``: the top-1 class of every image (of this process).
    """
    device = torch.device(device)
    iterable = batches.epoch(0) if hasattr(batches, "epoch") else batches
    total = len(batches) if hasattr(batches, "__len__") else None
    if env is not None and env.distributed:  # as many forwards everywhere: a sharded model keeps pace
        iterable = even_batches(iterable, len(batches), env)
    k = len(class_names)
    confusion = torch.zeros(k, k, dtype=torch.int64)
    loss_sum, top5_hits, n = 0.0, 0, 0
    predictions: list[torch.Tensor] = []
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
        if keep_predictions:
            predictions.append(top[:, 0].cpu())
        n += len(y)
    if env is not None:  # the shares are disjoint: each image counted once
        confusion = sum_across_ranks(confusion, env).long()
        loss_sum, top5_hits, n = sum_across_ranks([loss_sum, top5_hits, n], env).tolist()
        n = int(n)
    if n == 0:
        raise ValueError("nothing to evaluate: the evaluation set is empty")
    return EvalResult(n, loss_sum / n, confusion.diagonal().sum().item() / n, top5_hits / n, confusion, class_names,
                      torch.cat(predictions) if keep_predictions else None)


def evaluate_checkpoint(checkpoint: str | os.PathLike, *, data: str | None = None, split: str | None = None,
                        batch_size: int = 256, device: str = "auto", precision: str = "fp32",
                        progress: bool = False, flip_tta: bool = False, runtime: str | None = None,
                        real_labels: str | os.PathLike | None = None, classes: tuple[int, ...] | None = None,
                        log: Callable[[str], None] = print) -> tuple[EvalResult, str]:
    """Evaluate a model file or run directory on a split of ``data``; returns (result, split used).

    For a run directory, ``data`` defaults to the run's data and the run's ``val_split`` and
    seed are reused, so ``val`` is the same held-out set as in training. ``split``: ``test``
    (the default when there is one), ``val`` or ``train``. An exported model (``.onnx``, ``.xml``)
    runs on its runtime (``runtime`` forces one; see ``vitlab.deploy``). ``real_labels``: a ReaL
    ``real.json`` for the split's images (an image folder), read and checked before the model runs;
    its top-1 goes into ``result.real``. ``classes``: evaluate on these classes of the data only,
    relabelled 0..k-1 in that order (as `DataConfig.classes`; a run directory's own by default).
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
                                              classes=classes, batch_size=batch_size, log=log)
    labels = None
    if real_labels is not None:
        if not isinstance(loader.dataset, ImageFolderDataset):
            raise ValueError(f"--real-labels matches labels to image file names, but {data or run_cfg.data.path} "
                             f"is not an image folder; pass ImageNet's validation images as DIR/val/<class>/<image>")
        labels = read_real_labels(real_labels, num_images=len(loader.dataset), num_classes=len(class_names))
    result = evaluate(loaded.model, loader, class_names=class_names, device=dev, precision=precision,
                      progress=progress, flip_tta=flip_tta, keep_predictions=labels is not None)
    if labels is not None:
        if loader.skipped:
            raise ValueError(f"{len(loader.skipped)} image(s) of the split could not be read ({loader.skipped[0]}); "
                             f"ReaL labels follow the file names of every image: repair or restore them")
        files = [path for path, _ in loader.dataset.samples]
        result.real = real_top1(result.predictions, files, labels, str(real_labels))
    return result, split


def same_classes(loaded: LoadedModel, names: list[str]) -> bool:
    """Whether the data's class ``names`` are the model's: the same names, or for a released model the
    WordNet ids of its label list (ImageNet's class folders, ``n01440764`` ...)."""
    if loaded.class_names is None or loaded.class_names == names:
        return True
    label_list = entry_for(loaded.meta["pretrained"]).labels if "pretrained" in loaded.meta else None
    return bool(label_list) and synsets(label_list) == names


def split_loader(loaded: LoadedModel, data: str | None, split: str | None = None, *, base: DataConfig | None = None,
                 classes: tuple[int, ...] | None = None, batch_size: int = 256,
                 log: Callable[[str], None] = print) -> tuple[Loader, str, list[str]]:
    """An evaluation loader over ``split`` of ``data`` (default: test, else val) preprocessed for
    ``loaded`` (its size, mean and std; ``base``: a run's data settings; ``classes``: only these of
    the data's classes, replacing ``base``'s); returns it, the split and the data's class names,
    checked against the model's."""
    mcfg = loaded.config
    size = as_pair(mcfg.image_size)
    base = base or DataConfig()
    chosen = {} if classes is None else {"classes": tuple(classes)}
    data_cfg = dataclasses.replace(base, path=data or base.path, image_size=size[0],
                                   mean=tuple(mcfg.mean), std=tuple(mcfg.std), **chosen)
    splits = build_data(data_cfg, log=log)
    if not same_classes(loaded, splits.class_names):
        names = splits.class_names
        fix = "evaluate on the data the model was trained for"
        if not data_cfg.classes and set(loaded.class_names) < set(names):  # trained on some of these classes
            fix = (f"the model was trained on {len(loaded.class_names)} of the data's {len(names)} classes: pass "
                   f"--classes {' '.join(str(names.index(n)) for n in loaded.class_names)}")
        raise ValueError(f"the checkpoint's classes {loaded.class_names[:5]}... differ from the data's "
                         f"{names[:5]}...; {fix}")
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
