"""The Loader: deterministic, shardable, resumable batches with augmentation and Mixup/CutMix.

Every random choice of batch ``b`` in epoch ``e`` comes from a seed derived from
``(seed, e, rank, b)`` (or ``(seed, e, index)`` per streamed sample), never from global state,
so ``epoch(e, start_batch=k)`` yields exactly the batches ``k, k+1, ...`` of ``epoch(e)``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

Batches = Iterator[tuple[Tensor, Tensor]]

from .augment import TrainAugment, mix
from .config import DataConfig
from .datasets import ArrayDataset
from .images import normalize, resize_center_crop, to_uint8_tensor

MAX_REPORTED = 5  # unreadable files named in the log; the rest are counted


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a deterministic function of the non-negative integers ``keys``."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def resolve_crop(cfg: DataConfig) -> str:
    """``"auto"`` -> pad-crop for images of 32 px or less, random-resized crop above."""
    if cfg.crop == "auto":
        return "pad" if cfg.image_size <= 32 else "rrc"
    return cfg.crop


class _Streamed(Dataset):
    """Wraps a dataset for DataLoader workers: key ``(index, epoch)`` -> uint8 image, label, error."""

    def __init__(self, dataset: Dataset, image_size: int, augment: TrainAugment | None, seed: int) -> None:
        self.dataset, self.image_size, self.augment, self.seed = dataset, image_size, augment, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor | None, int, str | None]:
        index, epoch = key
        try:
            image, label = self.dataset[index]
        except (ValueError, OSError) as err:  # unreadable, truncated or vanished: skipped, reported
            return None, -1, str(err)
        x = to_uint8_tensor(image) if isinstance(image, Image.Image) else image
        if self.augment is None:
            return resize_center_crop(x, self.image_size), int(label), None
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index))
        return self.augment.one(x, g), int(label), None


def _collate(items: list[tuple[Tensor | None, int, str | None]]) -> tuple[Any, Tensor, list[str]]:
    good = [(x, y) for x, y, err in items if err is None]
    errors = [err for _, _, err in items if err is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([y for _, y in good], dtype=torch.int64), errors


class Loader:
    """Batches over a dataset, deterministic given (seed, epoch), resumable mid-epoch."""

    def __init__(self, dataset: Dataset, cfg: DataConfig, *, batch_size: int, train: bool,
                 num_classes: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool | None = None, log: Callable[[str], None] = print) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        labels = getattr(dataset, "labels", None)
        if labels is not None and len(labels) and int(labels.max()) >= num_classes:
            raise ValueError(f"the dataset has label {int(labels.max())} but num_classes is {num_classes}; "
                             f"pass num_classes=len(data.class_names)")
        self.dataset, self.cfg, self.batch_size, self.train = dataset, cfg, batch_size, train
        self.num_classes, self.rank, self.world_size, self.log = num_classes, rank, world_size, log
        self.drop_last = train if drop_last is None else drop_last
        self.augment = TrainAugment(
            image_size=cfg.image_size, crop=resolve_crop(cfg), crop_padding=cfg.crop_padding,
            rrc_scale=cfg.rrc_scale, hflip=cfg.hflip, randaugment_n=cfg.randaugment_n,
            randaugment_m=cfg.randaugment_m) if train else None
        self.mixing = train and (cfg.mixup > 0 or cfg.cutmix > 0)
        self.skipped: list[str] = []  # every unreadable file met, with its error
        if train and len(self) == 0:
            raise ValueError(f"{self._share()} training sample(s) per rank is less than one batch of "
                             f"{batch_size}; lower --batch-size (or add training images)")

    def _share(self) -> int:
        n = len(self.dataset)  # type: ignore[arg-type]
        # Train: every rank gets n // world_size so all ranks step together; eval: all samples.
        return n // self.world_size if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        share = self._share()
        return share // self.batch_size if self.drop_last else math.ceil(share / self.batch_size)

    def indices(self, epoch: int) -> Tensor:
        """This rank's sample indices for ``epoch`` in order (a seeded permutation when training)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.train:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, epoch))
            order = torch.randperm(n, generator=g)
            if (r := self.cfg.repeated_aug) > 1:  # r copies side by side: one global batch (ranks take turns)
                order = order[: math.ceil(n / r)].repeat_interleave(r)[:n]
        else:
            order = torch.arange(n)
        return order[self.rank::self.world_size][: self._share()]

    def epoch(self, epoch: int, start_batch: int = 0, *, placeholders: bool = False) -> Batches:
        """The batches ``start_batch ..`` of ``epoch``: (images float32 (B, C, H, W), targets).

        Targets are int64 (B,) class indices, or float32 (B, num_classes) soft targets when
        Mixup/CutMix are on (training only). A batch with no readable image is skipped, or with
        ``placeholders`` yields None in its place, so batch b is always the b-th item (exact resume).
        """
        if epoch < 0 or not 0 <= start_batch <= len(self):
            raise ValueError(f"epoch {epoch} / start_batch {start_batch} out of range "
                             f"(the epoch has {len(self)} batches)")
        idx = self.indices(epoch)
        batches = [idx[b * self.batch_size:(b + 1) * self.batch_size] for b in range(start_batch, len(self))]
        if isinstance(self.dataset, ArrayDataset):
            return self._array_batches(epoch, start_batch, batches)
        return self._streamed_batches(epoch, start_batch, batches, placeholders)

    def _array_batches(self, epoch: int, start: int, batches: list[Tensor]) -> Batches:
        data: ArrayDataset = self.dataset  # type: ignore[assignment]
        for b, idx in enumerate(batches, start):
            x = data.images[idx]  # uint8 (B, 3, h, w)
            if self.augment is None:
                x = resize_center_crop(x, self.cfg.image_size)
            else:
                x = self.augment.batch(x, torch.Generator().manual_seed(self._batch_seed(epoch, b)))
            yield self._finish(x, data.labels[idx], epoch, b)

    def _streamed_batches(self, epoch: int, start: int, batches: list[Tensor], placeholders: bool) -> Batches:
        keys = [[(i, epoch) for i in idx.tolist()] for idx in batches]
        loader = DataLoader(_Streamed(self.dataset, self.cfg.image_size, self.augment, self.cfg.seed),
                            batch_sampler=keys, num_workers=self.cfg.num_workers, collate_fn=_collate,
                            generator=torch.Generator())  # its own: the global RNG is not drawn from
        bad = 0
        try:
            for b, (x, y, errors) in enumerate(loader, start):
                for err in errors:
                    if len(self.skipped) < MAX_REPORTED:
                        self.log(f"skipping unreadable image: {err}")
                    self.skipped.append(err)
                bad += len(errors)
                if x is None:
                    self.log(f"batch {b} of epoch {epoch} has no readable image; skipped")
                    if placeholders:
                        yield None
                    continue
                yield self._finish(x, y, epoch, b)
        finally:
            if bad:
                where = f" on rank {self.rank}" if self.world_size > 1 else ""
                self.log(f"epoch {epoch}{where}: skipped {bad} unreadable image(s) "
                         f"({len(self.skipped)} in total so far)")

    def _batch_seed(self, epoch: int, b: int) -> int:
        return derive_seed(self.cfg.seed, epoch, self.rank, b)

    def _finish(self, x: Tensor, y: Tensor, epoch: int, b: int) -> tuple[Tensor, Tensor]:
        """uint8 -> normalised float32; Mixup/CutMix with the batch's own seed."""
        images = normalize(x, self.cfg.mean, self.cfg.std)
        if not self.mixing:
            return images, y
        rng = np.random.default_rng(self._batch_seed(epoch, b))
        return mix(images, y, self.num_classes, self.cfg.mixup, self.cfg.cutmix, rng)
