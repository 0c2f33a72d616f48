"""Helpers shared by the test files (pytest puts this folder on sys.path)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py``, e.g. ``"cifar/cifar10_budget"`` (the folders are not packages)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name.replace('/', '_')}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values everywhere (zero-initialised heads and biases too), norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_scale = p.ndim == 1 and any(n in name for n in ("norm", "gn")) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_scale else 0.2 * noise)
    return module.eval()


def write_cifar(root: Path, per_batch: int = 16, n_test: int = 20) -> Path:
    """A tiny CIFAR-10 binary folder whose classes differ in colour, so a few steps learn something."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def records(n: int) -> bytes:
        labels = np.arange(n) % 10
        pixels = rng.integers(0, 60, (n, 3, 32, 32)).astype(np.uint8)
        for i, c in enumerate(labels):
            pixels[i, c % 3] += np.uint8(20 * c)
        return np.concatenate([labels[:, None].astype(np.uint8), pixels.reshape(n, -1)], 1).tobytes()

    for i in range(1, 6):
        (root / f"data_batch_{i}.bin").write_bytes(records(per_batch))
    (root / "test_batch.bin").write_bytes(records(n_test))
    return root


def params_and_timm_params(name: str, timm_name: str, num_classes: int = 21843) -> tuple[int, int]:
    """Parameter counts of a vitlab preset and of timm's model of the same name (meta device)."""
    import pytest

    import vitlab

    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
        ours = vitlab.create_model(name, num_classes=num_classes)
    return n_params(ours), n_params(ref)


TINY = dict(width=32, depth=1, mlp_dim=64, num_heads=2)  # a ViT that trains in milliseconds


def tiny_cfg(data: Path, **kw):
    """A TrainConfig of the tiny ViT on ``data``: 12 steps of 16, evaluated and checkpointed every 4."""
    from vitlab.data import DataConfig
    from vitlab.trainconfig import TrainConfig

    base = dict(model="vit_mu4_32px", model_overrides=dict(TINY), data=DataConfig(path=str(data)), batch_size=16,
                steps=12, eval_every=4, checkpoint_every=4, threads=1, precision="fp32")
    return TrainConfig(**{**base, **kw})
