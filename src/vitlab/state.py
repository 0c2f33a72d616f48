"""The train state (what makes resume exact) and its checkpoint; stopping safely on a signal.

``state.pt`` holds weights, EMA, optimiser, step, RNG states, the data position and the
schedules' `Pace`; ``last.safetensors`` the evaluated weights. Both are written atomically, and
never with non-finite weights.
"""
from __future__ import annotations

import dataclasses
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import save_model, save_state
from .distributed import load_model_state, load_optimizer_state, model_state, optimizer_state, unwrap
from .errors import TrainingDiverged
from .run import LAST_FILE, STATE_FILE


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
