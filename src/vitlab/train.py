"""The training loop, top to bottom: ``train(cfg, run_dir)``.

Build the data, model and optimiser; start (fixing the run length, `budget.py`) or resume
(`state.py`); then per step: learning rate, micro-batches (gradient accumulation) under bf16
autocast, global-norm clipping, optimiser step, optional weight EMA, log; evaluation and
checkpoints every n steps through ``every``. What a run directory holds is in `run.py`.

Resuming is exact: batches are a function of (seed, epoch, batch) and the learning rate a
function of the step, so the train state is all a run needs to continue bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .accel import accelerate
from .budget import Pacer, measure_speed, resolve_length, size_schedule
from .checkpoint import load_model, load_state, save_model, write_json
from .config import to_dict
from .data import Loader, build_data
from .data.build import resolve_path
from .data.loader import derive_seed
from .distributed import (DistEnv, autocast, barrier, broadcast_object, init_distributed, max_across_ranks,
                          model_state, parallelize, set_gradient_sync, shutdown, sum_across_ranks, unwrap)
from .evaluate import evaluate
from .models import build_model, list_models, preset_name
from .optim import build_optimizer, lr_at, update_ema
from .plots import plot_curves
from .run import (BEST_FILE, CONFIG_FILE, CURVES_FILE, METRICS_FILE, STATE_FILE, MetricsLog, RunLock,
                  check_run_dir, check_same_data, data_fingerprint, load_run_config, read_metrics)
from .errors import Interrupted, TrainingDiverged
from .state import Pace, StopOnSignal, TrainState, save_checkpoint
from .surgery import freeze, load_pretrained
from .trainconfig import RESUME_FIELDS, TrainConfig, override, parse_duration

PLOT_EVERY_S = 60.0  # curves.png is redrawn after an evaluation at most this often, and at the end


def every(step: int, n: int) -> bool:
    """True every ``n`` steps (``n`` = 0: never)."""
    return n > 0 and step % n == 0


def forward_backward(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor] | None],
                     cfg: TrainConfig, device: torch.device, image_size: int | None = None,
                     teacher: Teacher | None = None) -> torch.Tensor | None:
    """Run ``cfg.accum_steps`` micro-batches, accumulating gradients; returns the step's mean loss.

    ``image_size`` below the batches' own size downscales them first (progressive resizing). A
    micro-batch with no readable image (None) adds nothing; None if the whole step had none. With
    a ``teacher`` its top-1 on the full-size batch is a second target (``cfg.distill_weight``).
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
        full = x
        if image_size and image_size != x.shape[-1]:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)  # (B, C, s, s)
        with autocast(device, cfg.precision):
            logits = model(x)  # (B, classes)
            taught = teacher.top1(full) if teacher is not None else None  # (B,)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if taught is not None:
            loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * F.cross_entropy(logits.float(), taught)
        loss = loss / cfg.accum_steps
        loss.backward()
        total += loss.detach()
    return total if used else None


class Teacher:
    """A trained model whose top-1 labels the training batches (distillation), on the student's inputs
    re-normalised to the teacher's mean and std."""

    def __init__(self, path: str, class_names: list[str], mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device):
        loaded = load_model(path, map_location=device)
        if loaded.class_names != class_names:
            raise ValueError(f"the teacher {path} predicts {len(loaded.class_names or [])} classes "
                             f"({', '.join((loaded.class_names or [])[:4])}, ...) but the data has {len(class_names)} "
                             f"({', '.join(class_names[:4])}, ...); train the teacher on the same data")
        self.model = loaded.model.requires_grad_(False)
        cfg = loaded.config
        shape = (1, -1, 1, 1)
        t_mean, t_std = torch.tensor(cfg.mean, device=device), torch.tensor(cfg.std, device=device)
        # x_teacher = (x * std + mean - t_mean) / t_std = x * scale + shift
        self.scale = (torch.tensor(std, device=device) / t_std).view(shape)
        self.shift = ((torch.tensor(mean, device=device) - t_mean) / t_std).view(shape)

    @torch.no_grad()
    def top1(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> the teacher's top-1 class (B,)."""
        return self.model(x * self.scale + self.shift).argmax(dim=-1)


@dataclass
class TrainData:
    """The run's data: its loaders, the split evaluated, and a fingerprint of the training files."""

    class_names: list[str]
    loader: Loader
    eval_loader: Loader | None
    eval_split: str
    steps_per_epoch: int
    fingerprint: dict[str, Any]

    def epoch(self, step: int, cfg: TrainConfig, world_size: int) -> Iterator[Any]:
        """The batches from ``step`` to the end of its epoch: step s always reads batch s (exact resume)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        return self.loader.epoch(epoch, start_batch=step_in_epoch * cfg.accum_steps, placeholders=world_size == 1)


@dataclass
class TrainResult:
    """Where a run ended: its directory, step, last evaluation and best top-1."""

    run_dir: Path
    step: int
    eval: dict[str, Any] | None
    best_top1: float | None


def load_data(cfg: TrainConfig, env: DistEnv, *, log: Callable[[str], None]) -> tuple[TrainConfig, TrainData]:
    """The config with its data resolved (absolute path, the model's size, the run's seed), and the loaders."""
    data_cfg = cfg.data_config()
    if Path(data_cfg.path).expanduser().exists():  # config.json holds an absolute path: eval works from anywhere
        data_cfg = dataclasses.replace(data_cfg, path=str(Path(data_cfg.path).expanduser().resolve()))
    cfg = dataclasses.replace(cfg, data=data_cfg)  # config.json shows the image size and seed really used
    data = build_data(data_cfg, log=log)
    if data.num_classes < 2:
        raise ValueError(f"{data_cfg.path} holds {data.num_classes} class ({', '.join(data.class_names)}); a "
                         f"classifier needs at least two class folders (root/<class>/<image>)")
    if cfg.batch_size % (cfg.accum_steps * env.world_size):
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by accum_steps x processes "
                         f"({cfg.accum_steps} x {env.world_size})")
    spread = dict(num_classes=data.num_classes, rank=env.rank, world_size=env.world_size, log=log)
    loader = Loader(data.train, data_cfg, batch_size=cfg.batch_size // (cfg.accum_steps * env.world_size),
                    train=True, **spread)
    eval_split, eval_set = ("val", data.val) if data.val is not None else ("test", data.test)
    eval_loader = None if eval_set is None else Loader(eval_set, data_cfg, batch_size=cfg.eval_batch_size,
                                                       train=False, **spread)
    if len(loader) < cfg.accum_steps:
        raise ValueError(f"the training set ({len(data.train)} images) is smaller than one batch of "
                         f"{cfg.batch_size}; lower --batch-size")
    return cfg, TrainData(data.class_names, loader, eval_loader, eval_split, len(loader) // cfg.accum_steps,
                          data_fingerprint(resolve_path(data_cfg, log=log)))


def build_state(cfg: TrainConfig, num_classes: int, env: DistEnv) -> TrainState:
    """The model (fine-tuning: from ``init_from``, frozen but the last blocks), its EMA and optimiser."""
    torch.manual_seed(cfg.seed)
    model = accelerate(build_model(cfg.model_config(num_classes=num_classes)))  # the CPU fast paths
    if cfg.init_from:  # fine-tuning: start from a checkpoint (a resumed run then loads its own state)
        load_pretrained(model, cfg.init_from)
    freeze(model, cfg.train_blocks)
    model = model.to(env.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay else None
    model = parallelize(model, env, shard=cfg.shard, activation_checkpointing=cfg.activation_checkpointing)
    ema = parallelize(ema, env, shard=cfg.shard) if ema is not None else None  # replicated or sharded alike
    return TrainState(model, build_optimizer(unwrap(model), cfg.optim), ema)


def start_or_resume(cfg: TrainConfig, run: Path, state: TrainState, data: TrainData, env: DistEnv, *, resume: bool,
                    started: float, log: Callable[[str], None],
                    teacher: Teacher | None = None) -> tuple[TrainConfig, Pacer | None]:
    """Resume ``state`` from the run's checkpoint, or fix a new run's length and write its config.json;
    returns the config in steps and, for a time budget, the `Pacer` that keeps it on time."""
    if resume:
        if not cfg.steps or cfg.time_budget:
            raise ValueError("resume needs the run's resolved config; use load_run_config(run_dir)")
        recorded = json.loads((run / CONFIG_FILE).read_text()).get("data_fingerprint")
        check_same_data(run, recorded, data.fingerprint, allow=cfg.allow_data_change, log=log)
        state.load_state_dict(load_state(run / STATE_FILE), data.steps_per_epoch, str(run / STATE_FILE))
        log(f"resuming {run} at step {state.step} of {state.pace.total if state.pace else cfg.steps}")
        state.pace = state.pace or Pace(cfg.steps, cfg.steps)  # a resumed run keeps its last plan
        return cfg, None
    budget_s = 0.05 * parse_duration(cfg.time_budget or "1s")  # probing: <= ~5% of a budget
    step = lambda model, batches, size: forward_backward(model, batches, cfg, env.device, size, teacher)  # noqa: E731
    cfg, sizing = resolve_length(cfg, data.steps_per_epoch, lambda: measure_speed(
        state.model, cfg, data.loader, data.eval_loader, env.device, step, max_seconds=budget_s),
        started=started, log=log)
    cfg, sizing = broadcast_object((cfg, sizing), env)  # a time budget: every process runs rank 0's steps
    model_cfg = unwrap(state.model).cfg
    if env.is_main:
        write_json(run / CONFIG_FILE, {
            "train": to_dict(cfg), "model_type": type(model_cfg).__name__, "model": to_dict(model_cfg),
            "class_names": data.class_names, "steps_per_epoch": data.steps_per_epoch, "sized_by": sizing,
            "data_fingerprint": data.fingerprint})
    state.pace = Pace(cfg.steps, cfg.steps)
    pacer = None if sizing is None else Pacer(
        sizing, started + sizing["seconds"], size_schedule(cfg), every=max(1, cfg.steps // 40),
        every_s=sizing["seconds"] / 100, eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every)
    return cfg, pacer


def describe(cfg: TrainConfig, state: TrainState, data: TrainData, env: DistEnv, run: Path) -> str:
    """The run in one line: model, parameters, device, steps, batch, schedule, evaluation."""
    model, total = state.model, cfg.steps
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    preset = run_preset(cfg, unwrap(model).cfg)
    micro = cfg.batch_size // (cfg.accum_steps * env.world_size)
    resizing = (f"images from {cfg.min_image_size} px to full size by step {round(cfg.resize_until * total)}; "
                if cfg.min_image_size else "")
    frozen = f" ({trained / 1e6:.2f}M trained)" if trained < params else ""
    scaled = f" (lr {cfg.optim.lr:g} at batch {cfg.optim.lr_batch_size}, scaled)" if cfg.optim.lr_batch_size else ""
    spread = (f", {'FSDP2-sharded' if cfg.shard else 'DDP'}" if env.world_size > 1 else "") + (
        ", activation checkpointing" if cfg.activation_checkpointing else "")
    alias = f", the {preset} preset" if preset != cfg.model else ""
    taught = f"distilled from {cfg.teacher} (weight {cfg.distill_weight:g}); " if cfg.teacher else ""
    return (f"{cfg.model}: {params / 1e6:.2f}M parameters{frozen}{alias} on {env.device} ({cfg.precision}{spread}); "
            f"{total} steps ({total / data.steps_per_epoch:.2f} epochs) of {cfg.batch_size} images (global batch = "
            f"{micro} per process x {env.world_size} processes x {cfg.accum_steps} accumulation steps); peak lr "
            f"{cfg.optim.peak_lr(cfg.batch_size):.3g}{scaled}, {cfg.optim.warmup(total)} warm-up steps, "
            f"{cfg.optim.schedule} decay; {resizing}{taught}evaluating on {data.eval_split if data.eval_loader else 'nothing'}"
            f" every {cfg.eval_every} steps; run directory {run}")


def run_preset(cfg: TrainConfig, model_cfg: Any) -> str:
    """The preset the run's model files are cards of (``vit_mu8_32px`` for Mu/4 with patch 8)."""
    named = preset_name(model_cfg, cfg.model)
    return named if named in list_models() else cfg.model


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          log: Callable[[str], None] = tqdm.write) -> TrainResult:
    """Train ``cfg`` into ``run_dir``; with ``resume`` continue the run there exactly."""
    started = time.perf_counter()
    env = init_distributed(cfg.device)  # torchrun's processes join one group; a plain process runs alone
    log = log if env.is_main else (lambda message: None)  # only rank 0 logs and writes files
    run = Path(broadcast_object(str(run_dir), env))  # rank 0's name (a default name holds the time)
    if env.is_main:
        check_run_dir(run, resume=resume)
    barrier()  # every process has looked before rank 0 writes there
    with RunLock(run) if env.is_main else contextlib.nullcontext():  # one process per run directory
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        cfg, data = load_data(cfg, env, log=log)
        state = build_state(cfg, len(data.class_names), env)
        if cfg.teacher and Path(cfg.teacher).exists():  # config.json records where it was
            cfg = dataclasses.replace(cfg, teacher=str(Path(cfg.teacher).resolve()))
        teacher = Teacher(cfg.teacher, data.class_names, cfg.data.mean, cfg.data.std, env.device) if cfg.teacher \
            else None
        cfg, pacer = start_or_resume(cfg, run, state, data, env, resume=resume, started=started, log=log,
                                     teacher=teacher)
        log(describe(cfg, state, data, env, run))
        loop = Loop(cfg, run, state, data, env, log)
        try:
            with StopOnSignal() as stop:
                while state.step < state.pace.total:
                    position = state.pace.position(state.step)
                    lr = lr_at(position, peak=cfg.optim.peak_lr(cfg.batch_size), warmup=cfg.optim.warmup(cfg.steps),
                               total=cfg.steps, schedule=cfg.optim.schedule, min_ratio=cfg.optim.min_lr_ratio)
                    image_size = loop.image_size_of(position, cfg.steps)
                    for group in state.optimizer.param_groups:
                        group["lr"] = lr
                    if env.world_size > 1:  # dropout masks differ per process, a function of the step: exact resume
                        torch.manual_seed(derive_seed(cfg.seed, state.step, env.rank))
                    batches = loop.batches(state.step)
                    state.model.train()
                    try:
                        loss = forward_backward(state.model, batches, cfg, env.device, image_size, teacher)
                    except StopIteration:
                        raise ValueError(f"epoch {state.step // data.steps_per_epoch} ended early: whole batches "
                                         f"of unreadable images were skipped; remove the files reported above") from None
                    loss_value, grad_norm = loop.update(loss)  # clip, check, step, EMA (none without a loss)
                    state.step = done = state.step + 1
                    due = pacer is not None and pacer.due(done) and done < state.pace.total
                    signum, replan = (int(v) for v in max_across_ranks([stop.signum, due], env).tolist())  # as one
                    loop.record(done, loss_value, grad_norm, lr, image_size, pacer, replan=bool(replan))
                    if data.eval_loader is not None and (every(done, cfg.eval_every) or done == state.pace.total):
                        loop.evaluate(done)
                    if every(done, cfg.checkpoint_every) or done == state.pace.total or signum:
                        loop.checkpoint(done)
                    if signum:
                        shutdown()  # every process stops here, together
                        raise Interrupted(signum, done, run)
        finally:  # also after an error or a signal: the curves show what happened
            loop.close()
    log(f"done: {state.step} steps in {time.perf_counter() - started:.0f} s; run directory {run}")
    shutdown()
    return TrainResult(run, state.step, loop.last_eval, state.best_top1 if state.best_top1 >= 0 else None)


class Loop:
    """What the loop does besides the step: the update, logging, evaluation, checkpoints, curves."""

    def __init__(self, cfg: TrainConfig, run: Path, state: TrainState, data: TrainData, env: DistEnv,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.run, self.state, self.data, self.env, self.log = cfg, run, state, data, env, log
        self.eval_model = state.ema if state.ema is not None else state.model
        self.preset = run_preset(cfg, unwrap(state.model).cfg)
        self.image_size_of = size_schedule(cfg)
        self.config = to_dict(cfg)
        self.metrics = MetricsLog(run / METRICS_FILE, keep_until=state.step) if env.is_main else None
        self.bar = tqdm(total=state.pace.total, initial=state.step, unit="step", dynamic_ncols=True,
                        disable=not env.is_main)
        self.last_eval: dict[str, Any] | None = None
        self.saved_step = state.step if (run / STATE_FILE).exists() else None
        self._batches: Iterator[Any] | None = None
        self.plotted = self.tick = time.perf_counter()

    def batches(self, step: int) -> Iterator[Any]:
        """The batch iterator for ``step``: a new one at each epoch's start (or at a resumed step)."""
        if self._batches is None or step % self.data.steps_per_epoch == 0:
            self._batches = self.data.epoch(step, self.cfg, self.env.world_size)
        return self._batches

    def update(self, loss: torch.Tensor | None) -> tuple[float | None, float | None]:
        """Clip, refuse a non-finite loss or gradient, step the optimiser and the EMA; returns the global
        batch's loss (averaged over processes) and the gradient norm, None without a loss."""
        state, cfg = self.state, self.cfg
        loss_value = grad_value = None
        if loss is not None:
            grad_value = nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.clip_grad_norm or math.inf).item()
            loss_value = sum_across_ranks([loss.item()], self.env).item() / self.env.world_size
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                kept = (f"the last good checkpoint (step {self.saved_step}) is kept in {self.run}" if self.saved_step
                        else "no checkpoint had been written yet")
                raise TrainingDiverged(f"loss {loss_value} (gradient norm {grad_value}) at step {state.step + 1}; "
                                       f"{kept}; lower --lr or check the data")
            state.optimizer.step()
            if state.ema is not None:
                update_ema(state.ema, state.model, cfg.ema_decay)
        else:  # no readable image in the step's batches: the step passes without an update
            self.log(f"step {state.step + 1}: no readable image in its batch; no update")
        state.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_value

    def record(self, done: int, loss: float | None, grad_norm: float | None, lr: float, image_size: int,
               pacer: Pacer | None, *, replan: bool) -> None:
        """Re-plan a budget run; log the step to metrics.jsonl and the progress bar."""
        step_s = time.perf_counter() - self.tick
        state, cfg = self.state, self.cfg
        if pacer is not None:
            pacer.record(image_size, step_s)
            if replan:
                state.pace = broadcast_object(pacer.replan(state.pace, done), self.env)  # rank 0's plan
                self.bar.total = state.pace.total
        if self.metrics is not None:
            epoch = round(done / self.data.steps_per_epoch, 4)
            if loss is None:
                self.metrics.write({"step": done, "epoch": epoch, "skipped": "no image"})
            else:
                images_per_s = cfg.batch_size / step_s
                self.metrics.write({"step": done, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                    "images_per_s": round(images_per_s, 1),
                                    **({"image_size": image_size} if cfg.min_image_size else {}),
                                    **({"steps_planned": state.pace.total} if pacer is not None else {})})
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
            self.bar.update()
        self.tick = time.perf_counter()

    def evaluate(self, done: int) -> None:
        """Evaluate the EMA (or the model); keep the best in best.safetensors; redraw the curves now and then."""
        state, data, cfg = self.state, self.data, self.cfg
        result = evaluate(self.eval_model, data.eval_loader, device=self.env.device, precision=cfg.precision,
                          class_names=data.class_names, env=self.env, flip_tta=cfg.flip_tta)
        self.last_eval = {"step": done, "eval_split": data.eval_split, "eval_loss": result.loss,
                          "eval_top1": result.top1, "eval_top5": result.top5}
        if self.metrics is not None:
            self.metrics.write(self.last_eval)
            self.log(f"step {done}/{state.pace.total}: {data.eval_split} top-1 {100 * result.top1:.2f}%, "
                     f"top-5 {100 * result.top5:.2f}%, loss {result.loss:.4f}")
        if result.top1 > state.best_top1:
            state.best_top1 = result.top1
            weights = model_state(self.eval_model)  # every process: a sharded model gathers
            if self.env.is_main:
                save_model(unwrap(self.eval_model), self.run / BEST_FILE, state_dict=weights,
                           class_names=data.class_names, meta={**self.last_eval, "model": self.preset})
        if self.env.is_main and time.perf_counter() - self.plotted > PLOT_EVERY_S:
            plot_curves(read_metrics(self.run / METRICS_FILE), self.run / CURVES_FILE)
            self.plotted = time.perf_counter()
        self.tick = time.perf_counter()  # the next step's time leaves the evaluation out

    def checkpoint(self, done: int) -> None:
        """last.safetensors and state.pt, recording the weights' own step and the last evaluation."""
        evaluated = {("eval_step" if k == "step" else k): v for k, v in (self.last_eval or {}).items()}
        save_checkpoint(self.run, self.state, self.eval_model, steps_per_epoch=self.data.steps_per_epoch,
                        config=self.config, class_names=self.data.class_names, is_main=self.env.is_main,
                        meta={**evaluated, "step": done, "model": self.preset})
        self.saved_step = done
        self.tick = time.perf_counter()

    def close(self) -> None:
        """Also after an error: the curves show what happened (a full disk may not let them be drawn)."""
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
            try:
                plot_curves(read_metrics(self.run / METRICS_FILE), self.run / CURVES_FILE)
            except OSError as err:  # the error that stopped the run is the one to report
                self.log(f"could not draw {self.run / CURVES_FILE}: {err.strerror or err}")


def resume(run_dir: str | os.PathLike, *, log: Callable[[str], None] = tqdm.write, **changes: Any) -> TrainResult:
    """Continue the run in ``run_dir`` exactly; ``changes`` may only move it (data path, device, threads, workers)."""
    bad = sorted(set(changes) - set(RESUME_FIELDS))
    if bad:
        raise ValueError(f"--resume continues a run exactly as configured; {bad} cannot change "
                         f"(only {', '.join(RESUME_FIELDS)} can); start a new run to change them")
    return train(override(load_run_config(run_dir), **changes), run_dir, resume=True, log=log)
