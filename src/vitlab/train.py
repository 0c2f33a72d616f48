"""Training from scratch: the config, the train state, and the loop.

``train(cfg, run_dir)`` is the whole loop, top to bottom: build the data, model and optimiser;
resume; then per step: learning rate, micro-batches (gradient accumulation) under bf16
autocast, global-norm clipping, optimiser step, optional weight EMA, log; evaluation and
checkpoints every n steps through ``every``.

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl``, ``curves.png``,
``last.safetensors`` / ``best.safetensors`` (the evaluated weights: the EMA when it is on) and
``state.pt`` (weights, EMA, optimiser, step, RNG states, data position), each written atomically.
Resuming is exact: batches are a function of (seed, epoch, batch) and the learning rate a
function of the step, so the state above is all a run needs to continue bit for bit.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import atomic_write, load_state, save_model, save_state, write_json
from .config import as_pair, check_numbers, from_dict, replace_checked, to_dict
from .data import DataConfig, Loader, build_data
from .data.build import resolve_path
from .data.loader import derive_seed
from .distributed import (barrier, broadcast_object, init_distributed, load_model_state, load_optimizer_state,
                          max_across_ranks, model_state, optimizer_state, parallelize, set_gradient_sync, shutdown,
                          sum_across_ranks, unwrap)
from .evaluate import evaluate
from .models import build_model, get_spec, list_models, preset_name
from .optim import OptimConfig, build_optimizer, lr_at, update_ema
from .run import CONFIG_FILE, METRICS_FILE, STATE_FILE, RunLock, check_run_dir, check_same_data, data_fingerprint
from .plots import plot_curves
from .transfer import freeze, load_pretrained

CURVES_FILE = "curves.png"
LAST_FILE, BEST_FILE = "last.safetensors", "best.safetensors"
PLOT_EVERY_S = 60.0  # curves.png is redrawn after an evaluation at most this often, and at the end

Precision = Literal["bf16", "fp32"]
# Data fields that follow the model (image size, normalisation) and the run (seed).
DERIVED_DATA_FIELDS = ("image_size", "mean", "std", "seed")
# What ``--resume`` may change: where things are, never what is computed.
RESUME_FIELDS = ("path", "device", "threads", "num_workers", "cache_dir", "shard", "activation_checkpointing",
                 "init_from", "allow_data_change")


# ---------------------------------------------------------------------------- the config

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


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The resolved config of the run in ``run_dir`` (its ``config.json``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} does not exist")
    try:
        return config_from_dict(json.loads(path.read_text())["train"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a vitlab run config ({err!r}); is it corrupted?") from err


# ---------------------------------------------------------------------------- the train state

@dataclass
class TrainState:
    """What makes resume exact: weights, EMA, optimiser, step (hence schedule and data position), RNG."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: nn.Module | None = None
    step: int = 0  # optimiser steps done; with `pace`, the schedules are a pure function of it
    best_top1: float = -1.0
    pace: Pace | None = None

    def state_dict(self, steps_per_epoch: int, config: dict[str, Any]) -> dict[str, Any]:
        epoch, batch = divmod(self.step, steps_per_epoch)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {
            "step": self.step,
            "data_position": {"epoch": epoch, "step_in_epoch": batch, "steps_per_epoch": steps_per_epoch},
            "model": model_state(self.model),  # full weights by name: any world size can resume
            "ema": model_state(self.ema) if self.ema is not None else None,
            "optimizer": optimizer_state(self.model, self.optimizer),
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda},
            "best_top1": self.best_top1,
            "pace": dataclasses.asdict(self.pace) if self.pace is not None else None,
            "config": config,
        }

    def load_state_dict(self, state: dict[str, Any], steps_per_epoch: int, source: str) -> None:
        missing = [k for k in ("step", "data_position", "model", "optimizer", "rng") if k not in state]
        if missing:
            raise ValueError(f"{source} lacks {missing}; it is not a vitlab training state")
        if state["data_position"]["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(f"{source} was written with {state['data_position']['steps_per_epoch']} steps per "
                             f"epoch, but the data now gives {steps_per_epoch}: the training data or batch size "
                             f"changed, so the run cannot continue exactly")
        load_model_state(self.model, state["model"], source=source)
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"{source} has no EMA weights but the run config has ema_decay > 0")
            load_model_state(self.ema, state["ema"], source=f"{source} (EMA)")
        try:
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"{source}: the optimiser state does not fit this model/optimiser ({err})") from err
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.best_top1 = int(state["step"]), float(state.get("best_top1", -1.0))
        self.pace = Pace(**state["pace"]) if state.get("pace") else None


# ---------------------------------------------------------------------------- helpers

class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at ``step``."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved; "
                         f"continue with: vitlab train --resume {run_dir}")
        self.signum, self.step, self.run_dir = signum, step, run_dir


class StopOnSignal:
    """In the ``with`` block SIGINT/SIGTERM set ``signum`` (the loop saves, then stops); a second one stops now."""

    def __enter__(self) -> StopOnSignal:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class MetricsLog:
    """``metrics.jsonl``, one JSON record per line; resuming first drops records after the resumed step."""

    def __init__(self, path: Path, *, keep_until: int) -> None:
        kept = [r for r in read_metrics(path) if r["step"] <= keep_until] if path.exists() else []
        write_json_lines(path, kept)
        self.file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line from a crash is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_json_lines(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


def every(step: int, n: int) -> bool:
    """True every ``n`` steps (``n`` = 0: never)."""
    return n > 0 and step % n == 0


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda if available, else cpu; a bad name is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return device


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on CPU or CUDA, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def image_size_at(step: int, total: int, *, low: int, high: int, until: float, multiple: int) -> int:
    """The training image size at ``step`` of ``total`` under progressive resizing.

    Rises linearly from ``low`` at step 0 to ``high`` at ``until * total`` steps, rounded down to a
    multiple of ``multiple`` (the patch size); ``high`` from there on, and always when ``low`` is 0.
    """
    ramp = until * total
    if not low or step >= ramp:
        return high
    return max(low, int((low + (high - low) * step / ramp) // multiple * multiple))


def size_schedule(cfg: TrainConfig) -> Callable[[int, int], int]:
    """``(step, total) -> image size`` for ``cfg`` (the model's size throughout without resizing)."""
    m = cfg.model_config(num_classes=None)
    high, patch = as_pair(m.image_size)[0], getattr(m, "patch_size", 1)
    return lambda step, total: image_size_at(step, total, low=cfg.min_image_size, high=high,
                                             until=cfg.resize_until, multiple=patch)


def size_fractions(cfg: TrainConfig, points: int = 1000) -> dict[int, float]:
    """The fraction of a run's steps spent at each image size (the same for any run length)."""
    sizes = [size_schedule(cfg)(step, points) for step in range(points)]
    return {s: sizes.count(s) / points for s in sorted(set(sizes))}


def forward_backward(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor] | None],
                     cfg: TrainConfig, device: torch.device, image_size: int | None = None) -> torch.Tensor | None:
    """Run ``cfg.accum_steps`` micro-batches, accumulating gradients; returns the step's mean loss.

    ``image_size`` below the batches' own size downscales them first (progressive resizing). A
    micro-batch with no readable image (None) adds nothing; None if the whole step had none.
    """
    total = torch.zeros((), device=device)
    used = 0
    for micro in range(cfg.accum_steps):
        set_gradient_sync(model, micro == cfg.accum_steps - 1)  # processes average gradients once per step
        batch = next(batches)
        if batch is None:
            continue
        x, y = batch
        used += 1
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if image_size and image_size != x.shape[-1]:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)  # (B, C, s, s)
        with autocast(device, cfg.precision):
            logits = model(x)  # (B, classes)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing) / cfg.accum_steps
        loss.backward()
        total += loss.detach()
    return total if used else None


def steps_for_budget(seconds: float, *, step_s: float, eval_s: float, eval_every: int, ckpt_s: float,
                     checkpoint_every: int) -> int:
    """The most steps T with T*step_s + (T/eval_every + 1)*eval_s + (T/checkpoint_every + 1)*ckpt_s <= seconds."""
    steps = (seconds - eval_s - ckpt_s) / (step_s + eval_s / eval_every + ckpt_s / checkpoint_every)
    return int(steps)


@dataclass
class Pace:
    """Where the lr and image-size schedules stand at each step: a position in ``plan`` steps.

    Without a time budget the position is the step itself. A budget run re-plans how many
    steps are left from the speed it measures (`replan`): from there the remaining steps are
    spread evenly over the rest of the schedules, which still end exactly at ``plan - 1``, so
    a faster or slower machine stretches or squeezes them instead of cutting them short.
    """

    plan: int  # the schedules' length, in steps (the first sizing)
    total: int  # steps the run takes (a budget run re-plans it)
    from_step: int = 0  # the last re-planning: its step ...
    from_position: float = 0.0  # ... and position

    def position(self, step: int) -> float:
        if step >= self.total - 1:
            return float(self.plan - 1)
        rate = (self.plan - 1 - self.from_position) / (self.total - 1 - self.from_step)
        return self.from_position + (step - self.from_step) * rate

    def replan(self, step: int, steps_left: int) -> Pace:
        """The same schedules with ``steps_left`` steps after ``step`` steps done (0: stop there)."""
        return Pace(self.plan, step + steps_left, step, self.position(step))


def step_seconds(step_times: dict[int, float], size: int) -> float:
    """A step's time at image ``size``, from times measured at the smallest and the full size.

    Taken as linear in the pixel (token) count: most of the work is per token; attention's
    quadratic part is small at these sizes.
    """
    lo, hi = min(step_times), max(step_times)
    slope = (step_times[hi] - step_times[lo]) / (hi**2 - lo**2) if hi > lo else 0.0
    return step_times[lo] + slope * (size**2 - lo**2)


class Pacer:
    """Keeps a time-budget run on its deadline: re-plans the steps left from the speed measured so far.

    The probe before step 0 sees a few steps; the machine's load can change after it, and its
    model of the sizes between the smallest and the full one is linear. Every ``every`` steps
    the steps left are sized again: each image size costs the median of its last measured
    steps, and a size not yet reached costs the probe's estimate scaled by how far the current
    size's measurement is from the probe's.
    """

    def __init__(self, sizing: dict[str, Any], deadline: float, size_at: Callable[[float, int], int], *,
                 every: int, eval_every: int, checkpoint_every: int) -> None:
        self.sizing, self.deadline, self.size_at, self.every = sizing, deadline, size_at, every
        self.intervals = {"eval_every": eval_every, "checkpoint_every": checkpoint_every}
        self.measured: dict[int, collections.deque[float]] = {}  # image size -> its last step times
        self.size = 0  # the last size with enough measured steps

    def record(self, size: int, seconds: float) -> None:
        times = self.measured.setdefault(size, collections.deque(maxlen=25))
        times.append(seconds)
        if len(times) >= 5:  # a size's first steps include one-off set-up: wait for a few
            self.size = size

    def slower(self) -> float:
        """The current size's measured step time over the probe's estimate (1 before any)."""
        if not self.size:
            return 1.0
        return statistics.median(self.measured[self.size]) / step_seconds(self.sizing["step_s_by_size"], self.size)

    def step_s(self, size: int) -> float:
        """The expected seconds of a step at ``size``: measured, or else the probe's estimate scaled."""
        if len(self.measured.get(size, ())) >= 5:
            return statistics.median(self.measured[size])
        return step_seconds(self.sizing["step_s_by_size"], size) * self.slower()

    def replan(self, pace: Pace, done: int) -> Pace:
        """``pace`` with the steps after ``done`` sized to end by the deadline (0 when it has passed)."""
        start = pace.position(done)
        points = [start + (pace.plan - 1 - start) * i / 99 for i in range(100)]
        step_s = statistics.fmean(self.step_s(self.size_at(p, pace.plan)) for p in points)
        left = steps_for_budget(self.deadline - time.perf_counter(), step_s=step_s,
                                eval_s=self.slower() * self.sizing["eval_s"], ckpt_s=self.sizing["checkpoint_s"],
                                **self.intervals)
        return pace.replan(done, max(0, left))


def measure_speed(model: nn.Module, cfg: TrainConfig, loader: Loader, eval_loader: Loader | None,
                  device: torch.device, *, warmup: int = 3, timed: int = 5,
                  max_seconds: float = math.inf) -> tuple[dict[int, float], float, float]:
    """Seconds per training step (by image size), per evaluation and per checkpoint, on a throwaway copy.

    With progressive resizing the smallest and the full size are timed (`step_seconds`
    interpolates between them). The copy has its own optimiser and the RNG states are restored afterwards,
    so the run itself is untouched: sizing the schedule does not change what the run computes.
    Past ``max_seconds`` each size gets its warm-up steps and one timed step.
    """
    probe = copy.deepcopy(model).train()
    optimizer = build_optimizer(probe, cfg.optim)
    batches = loader.epoch(0)
    shares = size_fractions(cfg)
    timed_sizes = sorted({min(shares), max(shares)}, reverse=True)
    step_times: dict[int, float] = {}
    probe_start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for size in timed_sizes:
            times = []
            for _ in range(min(warmup + timed, len(loader) // cfg.accum_steps)):
                start = time.perf_counter()
                try:
                    forward_backward(probe, batches, cfg, device, size)
                except StopIteration:  # a tiny data set: start the epoch again
                    batches = loader.epoch(0)
                    forward_backward(probe, batches, cfg, device, size)
                nn.utils.clip_grad_norm_(probe.parameters(), cfg.optim.clip_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
                if len(times) > warmup and time.perf_counter() - probe_start > max_seconds:
                    break  # warm-up steps (first-call kernel set-up: seconds in bf16) are never timed
            step_times[size] = statistics.median(times[warmup:] or times)
        eval_s = 0.0
        if eval_loader is not None and len(eval_loader):
            batch_times = []
            probe.eval()
            with torch.no_grad():
                for x, _ in eval_loader.epoch(0):
                    start = time.perf_counter()
                    with autocast(device, cfg.precision):
                        probe(x.to(device))
                    batch_times.append(time.perf_counter() - start)
                    if len(batch_times) == 2:
                        break
            eval_s = batch_times[-1] * len(eval_loader) * (2 if cfg.flip_tta else 1)  # flip: two passes
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        save_checkpoint(Path(tmp), TrainState(probe, optimizer), probe, steps_per_epoch=1, config={},
                        class_names=[], meta={})
        ckpt_s = time.perf_counter() - start
    return step_times, eval_s, ckpt_s


def resolve_length(cfg: TrainConfig, steps_per_epoch: int,
                   measure: Callable[[], tuple[dict[int, float], float, float]], *,
                   started: float | None = None, log: Callable[[str], None] = print) -> tuple[TrainConfig, dict | None]:
    """The config with its run length and intervals fixed in steps, and how a time budget sized it.

    A time budget calls ``measure()`` (seconds per step by image size, per evaluation and per
    checkpoint) and takes the most steps that fit in what is left of the budget since ``started``
    (a ``time.perf_counter()`` reading; the measurement itself counts against the budget). The
    run re-plans from its own speed as it goes (`Pace`).
    """
    eval_every = cfg.eval_every or steps_per_epoch
    checkpoint_every = cfg.checkpoint_every or eval_every
    sizing = None
    if cfg.time_budget:
        step_times, eval_s, ckpt_s = measure()
        step_s = sum(share * step_seconds(step_times, size) for size, share in size_fractions(cfg).items())
        elapsed = 0.0 if started is None else time.perf_counter() - started
        total = steps_for_budget(parse_duration(cfg.time_budget) - elapsed, step_s=step_s, eval_s=eval_s,
                                 eval_every=eval_every, ckpt_s=ckpt_s, checkpoint_every=checkpoint_every)
        if total < 1:
            raise ValueError(f"time budget {cfg.time_budget} is too short: a step takes {step_s:.2f} s and "
                             f"an evaluation {eval_s:.1f} s")
        sizing = {"time_budget": cfg.time_budget, "seconds": parse_duration(cfg.time_budget), "step_s": step_s,
                  "step_s_by_size": step_times, "eval_s": eval_s, "checkpoint_s": ckpt_s}
        log(f"time budget {cfg.time_budget}: a step takes {step_s:.3f} s, an evaluation {eval_s:.1f} s "
            f"-> {total} steps")
    else:
        total = cfg.steps or max(1, round(cfg.epochs * steps_per_epoch))
    cfg = dataclasses.replace(cfg, steps=total, time_budget="", epochs=total / steps_per_epoch,
                              eval_every=eval_every, checkpoint_every=checkpoint_every)
    return cfg, sizing


def save_checkpoint(run: Path, state: TrainState, eval_model: nn.Module, *, steps_per_epoch: int,
                    config: dict[str, Any], class_names: list[str], meta: dict[str, Any], is_main: bool = True) -> None:
    """``last.safetensors`` (the evaluated weights) then ``state.pt``; each atomic.

    Every process calls it (a sharded model gathers its weights); only ``is_main`` writes.
    """
    full = state.state_dict(steps_per_epoch, config)
    bad = [k for k, v in full["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # never write (or call good) weights that diverged: the previous checkpoint stays
        raise TrainingDiverged(f"{len(bad)} of {len(full['model'])} weight tensors are not finite at step "
                               f"{state.step} ({bad[0]}, ...); the last good checkpoint in {run} is kept; "
                               f"lower --lr or check the data")
    if is_main:
        weights = full["ema"] if state.ema is not None else full["model"]  # eval_model's weights
        save_model(unwrap(eval_model), run / LAST_FILE, state_dict=weights, class_names=class_names, meta=meta)
        save_state(full, run / STATE_FILE)


@dataclass
class TrainResult:
    """Where a run ended: its directory, step, last evaluation and best top-1."""

    run_dir: Path
    step: int
    eval: dict[str, Any] | None
    best_top1: float | None


# ---------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          log: Callable[[str], None] = tqdm.write) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; with ``resume`` continue the run there exactly."""
    env = init_distributed(cfg.device)  # torchrun's processes join one group; a plain process runs alone
    rank, world_size, device = env.rank, env.world_size, env.device
    is_main = env.is_main  # only rank 0 logs and writes files
    log = log if is_main else (lambda message: None)
    run = Path(broadcast_object(str(run_dir), env))  # rank 0's name (a default name holds the time)
    start_time = time.perf_counter()
    if is_main:
        check_run_dir(run, resume=resume)
    barrier()  # every process has looked before rank 0 writes there
    with RunLock(run) if is_main else contextlib.nullcontext():  # one process per run directory
        return _train(cfg, run, env, resume=resume, log=log, start_time=start_time)


def _train(cfg: TrainConfig, run: Path, env: Any, *, resume: bool, log: Callable[[str], None],
           start_time: float) -> TrainResult:
    rank, world_size, device, is_main = env.rank, env.world_size, env.device, env.is_main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # -- data
    data_cfg = cfg.data_config()
    if Path(data_cfg.path).expanduser().exists():  # config.json holds an absolute path: eval works from anywhere
        data_cfg = dataclasses.replace(data_cfg, path=str(Path(data_cfg.path).expanduser().resolve()))
    cfg = dataclasses.replace(cfg, data=data_cfg)  # config.json shows the image size and seed really used
    data = build_data(data_cfg, log=log)
    fingerprint = data_fingerprint(resolve_path(data_cfg, log=log))
    if resume:
        recorded = json.loads((run / CONFIG_FILE).read_text()).get("data_fingerprint")
        check_same_data(run, recorded, fingerprint, allow=cfg.allow_data_change, log=log)
    if data.num_classes < 2:
        raise ValueError(f"{data_cfg.path} holds {data.num_classes} class ({', '.join(data.class_names)}); a "
                         f"classifier needs at least two class folders (root/<class>/<image>)")
    if cfg.batch_size % (cfg.accum_steps * world_size):
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by accum_steps x processes "
                         f"({cfg.accum_steps} x {world_size})")
    micro_batch = cfg.batch_size // (cfg.accum_steps * world_size)
    loader = Loader(data.train, data_cfg, batch_size=micro_batch, train=True, num_classes=data.num_classes,
                    rank=rank, world_size=world_size, log=log)
    eval_split, eval_set = ("val", data.val) if data.val is not None else ("test", data.test)
    eval_loader = None if eval_set is None else Loader(
        eval_set, data_cfg, batch_size=cfg.eval_batch_size, train=False, num_classes=data.num_classes,
        rank=rank, world_size=world_size, log=log)
    steps_per_epoch = len(loader) // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(data.train)} images) is smaller than one batch of "
                         f"{cfg.batch_size}; lower --batch-size")

    # -- model, EMA, optimiser
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config(num_classes=data.num_classes)
    model = build_model(model_cfg)
    if cfg.init_from:  # fine-tuning: start from a checkpoint (a resumed run then loads its own state)
        load_pretrained(model, cfg.init_from)
    freeze(model, cfg.train_blocks)
    model = model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay else None
    model = parallelize(model, env, shard=cfg.shard, activation_checkpointing=cfg.activation_checkpointing)
    ema = parallelize(ema, env, shard=cfg.shard) if ema is not None else None  # replicated or sharded alike
    state = TrainState(model, build_optimizer(unwrap(model), cfg.optim), ema)
    eval_model = ema if ema is not None else model

    # -- run length, then resume or start
    sizing = None  # how a time budget sized the run (a new run only)
    if resume:
        if not cfg.steps or cfg.time_budget:
            raise ValueError("resume needs the run's resolved config; use load_run_config(run_dir)")
        state.load_state_dict(load_state(run / STATE_FILE), steps_per_epoch, str(run / STATE_FILE))
        log(f"resuming {run} at step {state.step} of {state.pace.total if state.pace else cfg.steps}")
    else:
        cfg, sizing = resolve_length(cfg, steps_per_epoch, lambda: measure_speed(  # probing: <= ~5% of a budget
            model, cfg, loader, eval_loader, device, max_seconds=0.05 * parse_duration(cfg.time_budget or "1s")),
            started=start_time, log=log)
        cfg, sizing = broadcast_object((cfg, sizing), env)  # a time budget: every process runs rank 0's steps
        if is_main:
            write_json(run / CONFIG_FILE, {
                "train": to_dict(cfg), "model_type": type(model_cfg).__name__, "model": to_dict(model_cfg),
                "class_names": data.class_names, "steps_per_epoch": steps_per_epoch, "sized_by": sizing,
                "data_fingerprint": fingerprint})
    config = to_dict(cfg)
    total, peak = cfg.steps, cfg.optim.peak_lr(cfg.batch_size)
    image_size_of = size_schedule(cfg)
    warmup = cfg.optim.warmup(total)
    pace = state.pace = state.pace or Pace(total, total)  # a resumed run keeps its last plan
    pacer = None if resume or sizing is None else Pacer(
        sizing, start_time + sizing["seconds"], image_size_of, every=max(1, total // 40),
        eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every)
    params = sum(p.numel() for p in model.parameters())
    named = preset_name(model_cfg, cfg.model)  # e.g. vit_mu8_32px for Mu/4 with patch 8
    preset = named if named in list_models() else cfg.model  # what the run's model files are cards of
    resizing = (f"images from {cfg.min_image_size} px to full size by step {round(cfg.resize_until * total)}; "
                if cfg.min_image_size else "")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = f" ({trained / 1e6:.2f}M trained)" if trained < params else ""
    scaled = f" (lr {cfg.optim.lr:g} at batch {cfg.optim.lr_batch_size}, scaled)" if cfg.optim.lr_batch_size else ""
    spread = (f", {'FSDP2-sharded' if cfg.shard else 'DDP'}" if world_size > 1 else "") + (
        ", activation checkpointing" if cfg.activation_checkpointing else "")
    alias = f", the {preset} preset" if preset != cfg.model else ""
    log(f"{cfg.model}: {params / 1e6:.2f}M parameters{frozen}{alias} on {device} ({cfg.precision}{spread}); {total} steps "
        f"({total / steps_per_epoch:.2f} epochs) of {cfg.batch_size} images (global batch = {micro_batch} per "
        f"process x {world_size} processes x {cfg.accum_steps} accumulation steps); peak lr {peak:.3g}{scaled}, "
        f"{warmup} warm-up steps, {cfg.optim.schedule} decay; {resizing}evaluating on {eval_split if eval_loader else 'nothing'}"
        f" every {cfg.eval_every} steps; run directory {run}")

    # -- the loop
    metrics = MetricsLog(run / METRICS_FILE, keep_until=state.step) if is_main else None
    bar = tqdm(total=pace.total, initial=state.step, unit="step", dynamic_ncols=True, disable=not is_main)
    last_eval: dict[str, Any] | None = None
    saved_step = state.step if (run / STATE_FILE).exists() else None
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
    plotted = time.perf_counter()
    try:
        with StopOnSignal() as stop:
            tick = time.perf_counter()
            while state.step < pace.total:
                step, position = state.step, pace.position(state.step)
                lr = lr_at(position, peak=peak, warmup=warmup, total=total, schedule=cfg.optim.schedule,
                           min_ratio=cfg.optim.min_lr_ratio)
                image_size = image_size_of(position, total)
                for group in state.optimizer.param_groups:
                    group["lr"] = lr
                epoch, step_in_epoch = divmod(step, steps_per_epoch)
                if world_size > 1:  # dropout masks differ per process, are a function of the step: exact resume
                    torch.manual_seed(derive_seed(cfg.seed, step, rank))
                if batches is None or step_in_epoch == 0:
                    batches = loader.epoch(epoch, start_batch=step_in_epoch * cfg.accum_steps,
                                           placeholders=world_size == 1)  # step s reads batch s, always

                model.train()
                try:
                    loss = forward_backward(model, batches, cfg, device, image_size)
                except StopIteration:
                    raise ValueError(f"epoch {epoch} ended early: whole batches of unreadable images were "
                                     f"skipped; remove the files reported above") from None
                if loss is not None:
                    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm or math.inf)
                    loss_value = sum_across_ranks([loss.item()], env).item() / world_size  # the global batch's loss
                    grad_value = grad_norm.item()
                    if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                        kept = (f"the last good checkpoint (step {saved_step}) is kept in {run}" if saved_step
                                else "no checkpoint had been written yet")
                        raise TrainingDiverged(f"loss {loss_value} (gradient norm {grad_value}) at step {step + 1}; "
                                               f"{kept}; lower --lr or check the data")
                    state.optimizer.step()
                    if ema is not None:
                        update_ema(ema, model, cfg.ema_decay)
                else:  # no readable image in the step's batches: the step passes without an update
                    log(f"step {step + 1}: no readable image in its batch; no update")
                state.optimizer.zero_grad(set_to_none=True)
                state.step = done = step + 1
                signum = int(max_across_ranks([stop.signum], env).item())  # all processes stop at one step

                step_s = time.perf_counter() - tick
                images_per_s = cfg.batch_size / step_s
                if pacer is not None:
                    pacer.record(image_size, step_s)
                    if every(done, pacer.every) and done < pace.total:
                        pace = state.pace = broadcast_object(pacer.replan(pace, done), env)  # rank 0's plan
                        bar.total = pace.total
                if is_main and loss is None:
                    metrics.write({"step": done, "epoch": round(done / steps_per_epoch, 4), "skipped": "no image"})
                    bar.update()
                elif is_main:
                    metrics.write({"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": loss_value,
                                   "lr": lr, "grad_norm": grad_value, "images_per_s": round(images_per_s, 1),
                                   **({"image_size": image_size} if cfg.min_image_size else {}),
                                   **({"steps_planned": pace.total} if pacer is not None else {})})
                    bar.update()
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")

                if eval_loader is not None and (every(done, cfg.eval_every) or done == pace.total):
                    result = evaluate(eval_model, eval_loader, device=device, precision=cfg.precision,
                                      class_names=data.class_names, env=env, flip_tta=cfg.flip_tta)
                    last_eval = {"step": done, "eval_split": eval_split, "eval_loss": result.loss,
                                 "eval_top1": result.top1, "eval_top5": result.top5}
                    if is_main:
                        metrics.write(last_eval)
                        log(f"step {done}/{pace.total}: {eval_split} top-1 {100 * result.top1:.2f}%, "
                            f"top-5 {100 * result.top5:.2f}%, loss {result.loss:.4f}")
                    if result.top1 > state.best_top1:
                        state.best_top1 = result.top1
                        weights = model_state(eval_model)  # every process: a sharded model gathers
                        if is_main:
                            save_model(unwrap(eval_model), run / BEST_FILE, state_dict=weights,
                                       class_names=data.class_names, meta={**last_eval, "model": preset})
                    if is_main and time.perf_counter() - plotted > PLOT_EVERY_S:
                        plot_curves(read_metrics(run / METRICS_FILE), run / CURVES_FILE)
                        plotted = time.perf_counter()
                if every(done, cfg.checkpoint_every) or done == pace.total or signum:
                    save_checkpoint(run, state, eval_model, steps_per_epoch=steps_per_epoch, config=config,
                                    class_names=data.class_names, is_main=is_main, meta={
                                        **{("eval_step" if k == "step" else k): v for k, v in (last_eval or {}).items()},
                                        "step": done, "model": preset})
                    saved_step = done
                if signum:
                    shutdown()  # every process stops here, together
                    raise Interrupted(signum, done, run)
                tick = time.perf_counter()
    finally:  # also after an error or a signal: the curves show what happened
        bar.close()
        if metrics is not None:
            metrics.close()
            plot_curves(read_metrics(run / METRICS_FILE), run / CURVES_FILE)
    log(f"done: {state.step} steps in {time.perf_counter() - start_time:.0f} s; run directory {run}")
    shutdown()
    return TrainResult(run, state.step, last_eval, state.best_top1 if state.best_top1 >= 0 else None)


def resume(run_dir: str | os.PathLike, *, log: Callable[[str], None] = tqdm.write, **changes: Any) -> TrainResult:
    """Continue the run in ``run_dir`` exactly; ``changes`` may only move it (data path, device, threads, workers)."""
    bad = sorted(set(changes) - set(RESUME_FIELDS))
    if bad:
        raise ValueError(f"--resume continues a run exactly as configured; {bad} cannot change "
                         f"(only {', '.join(RESUME_FIELDS)} can); start a new run to change them")
    return train(override(load_run_config(run_dir), **changes), run_dir, resume=True, log=log)

