"""The training config: ``TrainConfig`` (everything a run needs, a frozen dataclass) and ``override``.

Recipes (`recipes.py`) are TrainConfigs; the CLI's options derive from these fields; a run writes
the resolved config into its ``config.json`` (`run.py`).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import as_pair, check_numbers, from_dict, replace_checked
from .data import DataConfig
from .models import get_spec
from .optim import OptimConfig

Precision = Literal["bf16", "fp32"]
# Data fields that follow the model (image size, normalisation) and the run (seed).
DERIVED_DATA_FIELDS = ("image_size", "mean", "std", "seed")
# What ``--resume`` may change: where things are, never what is computed.
RESUME_FIELDS = ("path", "device", "threads", "num_workers", "cache_dir", "shard", "activation_checkpointing",
                 "init_from", "teacher", "allow_data_change")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run needs. Run length: ``time_budget`` if set, else ``steps``, else ``epochs``."""

    model: str = "vit_mu4_32px"  # a preset of `vitlab models`
    model_overrides: dict[str, Any] = field(default_factory=dict)  # model config fields, e.g. {"drop_path": 0.1}
    data: DataConfig = DataConfig()  # image_size, mean, std and seed follow the model and `seed`
    optim: OptimConfig = OptimConfig()
    batch_size: int = 128  # images per optimiser step (all micro-batches together)
    accum_steps: int = 1  # micro-batches per step (gradient accumulation)
    epochs: float = 1.0
    steps: int = 0  # total optimiser steps; 0: from epochs
    time_budget: str = ""  # e.g. "30m", "1h30m", "90s": sizes `steps` to end by then (see `steps_for_budget`)
    label_smoothing: float = 0.0
    # Progressive resizing: training images are downscaled to sizes rising linearly from
    # `min_image_size` to the model's size over the first `resize_until` of the steps (see
    # `image_size_at`); cheaper early steps buy more of them. The model needs dynamic_image_size.
    min_image_size: int = 0  # progressive resizing: the first training size (0: off)
    resize_until: float = 0.75  # progressive resizing: the model's size is reached at this fraction of the steps
    precision: Precision = "bf16"  # bf16 autocast (CPU and CUDA) or plain fp32
    ema_decay: float = 0.0  # weight EMA per step; 0 disables (when on, the EMA is evaluated and saved)
    # Distillation (DeiT's hard form, through the one head; Touvron et al. 2021): a trained model (file or
    # run) labels each training batch, and the loss is (1 - w) CE(labels) + w CE(teacher's top-1).
    teacher: str = ""  # the teacher's model file or run directory; "": no distillation
    distill_weight: float = 0.5  # w, the teacher's share of the loss
    eval_every: int = 0  # steps between evaluations; 0: once per epoch (always at the end)
    checkpoint_every: int = 0  # steps between checkpoints; 0: with each evaluation (always at the end)
    eval_batch_size: int = 256
    flip_tta: bool = False  # evaluations average the logits of each image and its mirror image
    seed: int = 0  # initialisation, dropout, data order, augmentation and split
    device: str = "auto"  # "auto": cuda if available, else cpu
    threads: int = 0  # torch CPU threads; 0: torch's default
    shard: bool = False  # under torchrun: FSDP2, parameters/gradients/optimiser state sharded over processes
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    init_from: str = ""  # fine-tuning: a model file whose weights start the run (head and posemb adapted)
    train_blocks: int = -1  # fine-tuning: train only the last K blocks + head (0: head only); -1: all
    allow_data_change: bool = False  # resume even if the training data's fingerprint changed

    def __post_init__(self) -> None:
        check_numbers(self)
        checks = [
            (self.batch_size >= 1 and self.accum_steps >= 1, "batch_size and accum_steps must be >= 1"),
            (self.batch_size % self.accum_steps == 0,
             f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}"),
            (self.epochs >= 0 and self.steps >= 0, "epochs and steps must be >= 0"),
            (self.epochs > 0 or self.steps > 0 or bool(self.time_budget), "set epochs, steps or time_budget"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.precision in ("bf16", "fp32"), "precision must be bf16 or fp32"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1) (0 disables)"),
            (0 < self.distill_weight <= 1, "distill_weight must be in (0, 1]"),
            (self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every and checkpoint_every must be >= 0"),
            (self.eval_batch_size >= 1 and self.threads >= 0 and self.seed >= 0,
             "eval_batch_size >= 1, threads >= 0 and seed >= 0"),
            ("num_classes" not in self.model_overrides, "num_classes comes from the data; do not override it"),
            (not (self.shard and self.time_budget), "time_budget cannot size a sharded run (its speed probe "
             "copies the model); set steps or epochs"),
            (self.train_blocks >= -1, "train_blocks must be >= 0, or -1 to train every parameter"),
            (self.min_image_size >= 0 and 0 < self.resize_until <= 1,
             "min_image_size must be >= 0 (0: off) and resize_until in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid TrainConfig: {message}")
        if self.time_budget:
            parse_duration(self.time_budget)
        m = self.model_config(num_classes=None)  # an unknown model or model field fails here
        if self.min_image_size:
            size, patch = as_pair(m.image_size)[0], getattr(m, "patch_size", 1)
            if not getattr(m, "dynamic_image_size", True):  # a ResNet (no such field) takes any size
                raise ValueError("invalid TrainConfig: min_image_size (progressive resizing) needs a model "
                                 "with dynamic_image_size=True (--dynamic-image-size)")
            if self.min_image_size % patch or not self.min_image_size < size:
                raise ValueError(f"invalid TrainConfig: min_image_size {self.min_image_size} must be a multiple "
                                 f"of the patch size {patch} and below the model's image size {size}")

    def model_config(self, num_classes: int | None) -> Any:
        """The model's config: the preset, the overrides, and ``num_classes`` when given."""
        extra = {} if num_classes is None else {"num_classes": num_classes}
        return replace_checked(get_spec(self.model).config, **self.model_overrides, **extra)

    def data_config(self) -> DataConfig:
        """The data config with the fields that follow the model (size, mean, std) and the run (seed)."""
        m = self.model_config(num_classes=None)
        h, w = as_pair(m.image_size)
        if h != w:
            raise ValueError(f"training uses square images; the model's image_size is {h}x{w}")
        return dataclasses.replace(self.data, image_size=h, mean=tuple(getattr(m, "mean", self.data.mean)),
                                   std=tuple(getattr(m, "std", self.data.std)), seed=self.seed)


def parse_duration(text: str) -> float:
    """``"30m"`` -> 1800.0; accepts h/m/s parts (``"1h30m"``, ``"2.5h"``) or plain seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s?)?\s*",
                         str(text))
    if not text or parts is None or not any(parts.groups()):
        raise ValueError(f"cannot read the duration {text!r}; write e.g. 30m, 1h30m, 90s or 2.5h")
    h, m, s = (float(g or 0) for g in parts.groups())
    if h * 3600 + m * 60 + s <= 0:
        raise ValueError(f"the duration {text!r} must be positive")
    return h * 3600 + m * 60 + s


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def override(cfg: TrainConfig, **values: Any) -> TrainConfig:
    """Set fields by name wherever they live: ``override(cfg, lr=3e-4, depth=2, mixup=0.8, path=...)``.

    A name goes to TrainConfig, OptimConfig, DataConfig (``path`` is the data path) or the
    model's config, in that order; an unknown name is an error naming the nearest ones. Setting
    one of ``time_budget``, ``steps``, ``epochs`` clears the others that are not also given. A new
    ``model`` keeps only the model options of ``cfg`` that its config has (``drop_path`` goes for a BiT).
    """
    model_fields = [f for f in field_names(type(get_spec(values.get("model", cfg.model)).config)) if f != "num_classes"]
    data_fields = [f for f in field_names(DataConfig) if f not in DERIVED_DATA_FIELDS]
    train_fields = [f for f in field_names(TrainConfig) if f not in ("data", "optim", "model_overrides")]
    parts: dict[str, dict[str, Any]] = {"train": {}, "optim": {}, "data": {}, "model": {}}
    for name, value in values.items():
        for part, names in (("train", train_fields), ("optim", field_names(OptimConfig)), ("data", data_fields),
                            ("model", model_fields)):
            if name in names:
                parts[part][name] = value
                break
        else:
            known = train_fields + field_names(OptimConfig) + data_fields + model_fields
            near = difflib.get_close_matches(name, known, n=3)
            raise ValueError(f"unknown option {name!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))
    if {"time_budget", "steps", "epochs"} & set(values):  # a new run length replaces the recipe's
        parts["train"] = {"time_budget": "", "steps": 0, "epochs": 0.0, **parts["train"]}
    kept = {k: v for k, v in cfg.model_overrides.items() if k in model_fields}
    return replace_checked(cfg, **parts["train"], optim=replace_checked(cfg.optim, **parts["optim"]),
                           data=replace_checked(cfg.data, **parts["data"]), model_overrides={**kept, **parts["model"]})


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from ``to_dict`` output (as in ``config.json``)."""
    data = dict(data)
    nested = {
        "data": from_dict(DataConfig, data.pop("data", {})),
        "optim": from_dict(OptimConfig, data.pop("optim", {})),
        "model_overrides": {k: tuple(v) if isinstance(v, list) else v
                            for k, v in data.pop("model_overrides", {}).items()},
    }
    return from_dict(TrainConfig, {**data, **nested})
