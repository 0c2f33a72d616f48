"""How a training run can stop early (torch-free, so the CLI can catch them without loading torch)."""
from __future__ import annotations

import signal
from pathlib import Path


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at ``step``. ``again``: how to continue."""

    def __init__(self, signum: int, step: int, run_dir: Path, *, again: str = "") -> None:
        again = again or f"checkpoint saved; continue with: vitlab train --resume {run_dir}"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {again}")
        self.signum, self.step, self.run_dir = signum, step, run_dir
