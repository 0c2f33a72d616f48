"""Training plots as PNG files (matplotlib, Agg backend): learning curves, confusion matrix."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoint import atomic_write  # noqa: E402


def _save(fig: Any, path: str | os.PathLike) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """``curves.png`` from ``metrics.jsonl`` records: training loss, eval accuracy, lr against step."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_top1" in r]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], lw=0.6, alpha=0.4, label="train (per step)")
    if len(train) >= 20:  # a running mean makes the trend readable
        w = max(len(train) // 50, 5)
        smooth = np.convolve([r["loss"] for r in train], np.ones(w) / w, mode="valid")
        ax_loss.plot(steps[w - 1:], smooth, lw=1.5, label=f"train (mean of {w})")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label=evals[-1]["eval_split"])
        for key, label in (("eval_top1", "top-1"), ("eval_top5", "top-5")):
            ax_acc.plot([r["step"] for r in evals], [100 * r[key] for r in evals], "o-", label=label)
        ax_acc.legend()
    ax_loss.set(title="loss", xlabel="step", ylabel="cross-entropy")
    ax_loss.legend()
    split = evals[-1]["eval_split"] if evals else "eval"
    ax_acc.set(title=f"{split} accuracy", xlabel="step", ylabel="%")
    ax_lr.plot(steps, [r["lr"] for r in train])
    ax_lr.set(title="learning rate", xlabel="step")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(confusion: Any, class_names: list[str], path: str | os.PathLike, *, title: str = "") -> Path:
    """A confusion-matrix heat map (rows: true class, columns: predicted), normalised per row."""
    counts = confusion.double()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    k = len(class_names)
    size = min(max(5.0, 0.45 * k + 2), 30.0)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 40:
        ax.set_xticks(range(k), class_names, rotation=90)
        ax.set_yticks(range(k), class_names)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.tight_layout()
    return _save(fig, path)
