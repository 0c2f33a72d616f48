"""A run's schedules in time: progressive image sizes, and a time budget turned into steps.

``resolve_length`` fixes a run's length in steps: from ``steps``/``epochs``, or from a time
budget and the speed ``measure_speed`` probes on a throwaway copy of the model. While a budget
run trains, a `Pacer` re-plans the steps left from the speed it sees (`Pace` in state.py).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import as_pair
from .data import Loader
from .distributed import autocast
from .optim import build_optimizer
from .state import Pace, TrainState, save_checkpoint
from .trainconfig import TrainConfig, parse_duration

Step = Callable[[nn.Module, Iterator[Any], int], Any]  # (model, batches, image size): forward + backward


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


def steps_for_budget(seconds: float, *, step_s: float, eval_s: float, eval_every: int, ckpt_s: float,
                     checkpoint_every: int) -> int:
    """The most steps T with T*step_s + (T/eval_every + 1)*eval_s + (T/checkpoint_every + 1)*ckpt_s <= seconds."""
    steps = (seconds - eval_s - ckpt_s) / (step_s + eval_s / eval_every + ckpt_s / checkpoint_every)
    return int(steps)


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
    model of the sizes between the smallest and the full one is linear. Every ``every`` steps,
    and at least every ``every_s`` seconds (a run that becomes much slower late re-plans in time
    for its schedule to finish), the steps left are sized again: each image size costs the median of its last measured
    steps, and a size not yet reached costs the probe's estimate scaled by how far the current
    size's measurement is from the probe's.
    """

    def __init__(self, sizing: dict[str, Any], deadline: float, size_at: Callable[[float, int], int], *,
                 every: int, every_s: float, eval_every: int, checkpoint_every: int) -> None:
        self.sizing, self.deadline, self.size_at, self.every, self.every_s = sizing, deadline, size_at, every, every_s
        self.planned_at = time.perf_counter()
        self.intervals = {"eval_every": eval_every, "checkpoint_every": checkpoint_every}
        self.measured: dict[int, collections.deque[float]] = {}  # image size -> its last step times
        self.size = 0  # the last size with enough measured steps

    def record(self, size: int, seconds: float) -> None:
        times = self.measured.setdefault(size, collections.deque(maxlen=9))  # recent: a slowdown shows within 5 steps
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

    def due(self, done: int) -> bool:
        """Whether to re-plan after ``done`` steps: every ``every`` steps or ``every_s`` seconds."""
        return done % self.every == 0 or time.perf_counter() - self.planned_at >= self.every_s

    def replan(self, pace: Pace, done: int) -> Pace:
        """``pace`` with the steps after ``done`` sized to end by the deadline (when it has passed, one
        step: the schedules still end, at the learning rate's final value)."""
        self.planned_at = time.perf_counter()
        start = pace.position(done)
        points = [start + (pace.plan - 1 - start) * i / 99 for i in range(100)]
        step_s = statistics.fmean(self.step_s(self.size_at(p, pace.plan)) for p in points)
        left = steps_for_budget(self.deadline - time.perf_counter(), step_s=step_s,
                                eval_s=self.slower() * self.sizing["eval_s"], ckpt_s=self.sizing["checkpoint_s"],
                                **self.intervals)
        return pace.replan(done, max(1, left))  # past the deadline: one last step, at the schedules' end


def measure_speed(model: nn.Module, cfg: TrainConfig, loader: Loader, eval_loader: Loader | None,
                  device: torch.device, step: Step, *, warmup: int = 3, timed: int = 5,
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
                    step(probe, batches, size)
                except StopIteration:  # a tiny data set: start the epoch again
                    batches = loader.epoch(0)
                    step(probe, batches, size)
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
