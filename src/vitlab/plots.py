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


GROUP_COLOURS = {"natural": "tab:green", "specialized": "tab:orange", "structured": "tab:blue", "other": "tab:gray"}


def plot_vtab(tasks: list[tuple[str, str, float]], means: dict[str, float], path: str | os.PathLike, *,
              title: str = "") -> Path:
    """VTAB-1k as bars: one per task ``(label, group, top-1)``, coloured by group, then one per group mean
    and the overall mean (``means``: group or ``"mean"`` -> top-1)."""
    labels = [label for label, _, _ in tasks] + [f"{group} mean" if group != "mean" else "VTAB mean" for group in means]
    values = [100 * top1 for _, _, top1 in tasks] + [100 * v for v in means.values()]
    colours = [GROUP_COLOURS.get(group, "tab:gray") for _, group, _ in tasks] + \
        [GROUP_COLOURS.get(group, "black") for group in means]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * len(labels) + 2), 4.8))
    bars = ax.bar(range(len(labels)), values, color=colours)
    for bar in bars[len(tasks):]:
        bar.set_hatch("//")
        bar.set_edgecolor("white")
    for x, v in enumerate(values):
        ax.text(x, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for g, c in GROUP_COLOURS.items()
               if any(group == g for _, group, _ in tasks)]
    ax.legend(handles, [g for g in GROUP_COLOURS if any(group == g for _, group, _ in tasks)], fontsize=8,
              loc="upper left", ncol=len(handles), frameon=False)
    ax.set(ylim=(0, 118), yticks=range(0, 101, 20), ylabel="test top-1 (%)", title=title or "VTAB-1k")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
