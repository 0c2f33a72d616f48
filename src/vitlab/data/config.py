"""The data configuration: where the images are, how they are split, preprocessed and augmented."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import check_numbers

CROPS = ("auto", "pad", "rrc", "none")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Data source and preprocessing; defaults follow the paper (inputs in [-1, 1])."""

    path: str = "cifar10"  # a CIFAR dir (binary or python layout), an image folder, or "cifar10"/"cifar100"
    image_size: int = 32  # model input resolution
    val_split: float = 0.0  # fraction of train held out as val (stratified, seeded); 0: the folder's own
    classes: tuple[int, ...] = ()  # keep these class indices (every split), relabelled 0..k-1 in this order; none: all
    train_subset: int = 0  # keep a class-balanced seeded random subset of N training images (nested in N); 0: all
    seed: int = 0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # (0.5, 0.5) maps [0, 1] to [-1, 1]
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop: str = "auto"  # "auto" (pad for <= 32 px, rrc above), "pad", "rrc", "none"
    crop_padding: int = 4
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    randaugment_n: int = 0  # RandAugment(N, M); N = 0 disables
    randaugment_m: int = 9
    repeated_aug: int = 1  # repeated augmentation (Hoffer et al. 2020; DeiT's RASampler, 3): each epoch draws
    # 1/r of the images, each r times in one global batch with its own augmentation; 1: off
    mixup: float = 0.0  # Beta(alpha, alpha); 0 disables
    cutmix: float = 0.0
    num_workers: int = 0  # worker processes for streamed folders
    cache_dir: str = "~/.cache/vitlab"

    def __post_init__(self) -> None:
        check_numbers(self, signed=("mean",))
        checks = [
            (self.image_size >= 1, "image_size must be a positive number of pixels"),
            (0.0 <= self.val_split < 1.0, "val_split must be in [0, 1)"),
            (self.seed >= 0, "seed must be a non-negative integer"),
            (len(self.mean) == 3 and len(self.std) == 3 and all(s > 0 for s in self.std),
             "mean and std need 3 values each, std positive"),
            (self.crop in CROPS, f"crop must be one of {CROPS}"),
            (self.crop_padding >= 0, "crop_padding must be >= 0"),
            (len(self.rrc_scale) == 2 and 0.0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1.0,
             "rrc_scale must be (min, max) with 0 < min <= max <= 1"),
            (self.randaugment_n >= 0 and 0 <= self.randaugment_m <= 30,
             "randaugment_n must be >= 0 and randaugment_m in [0, 30]"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0 (0 disables)"),
            (isinstance(self.repeated_aug, int) and self.repeated_aug >= 1,
             f"repeated_aug must be a repeat count >= 1 (1: off), got {self.repeated_aug}"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.classes),
             f"classes must be class indices >= 0, got {self.classes}"),
            (len(set(self.classes)) == len(self.classes),
             f"classes lists {sorted({c for c in self.classes if self.classes.count(c) > 1})} more than once"),
            (len(self.classes) != 1, f"classes {self.classes} keeps one class; a classifier needs at least two "
                                     f"(or none: all)"),
            (isinstance(self.train_subset, int) and self.train_subset >= 0,
             f"train_subset must be a number of images >= 0 (0: all), got {self.train_subset}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid DataConfig: {message} (got {self})")
