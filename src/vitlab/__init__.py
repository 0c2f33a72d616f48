"""vitlab: the Vision Transformer (Dosovitskiy et al., 2020), end to end on PyTorch.

The public names are loaded on first use (PEP 562), so ``vitlab --help`` starts without torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BiTConfig": "config", "HybridConfig": "config", "ViTConfig": "config",
    "LoadedModel": "checkpoint", "save_model": "checkpoint",
    "count_flops": "flops",
    "create_model": "hub", "list_pretrained": "hub", "load_model": "hub", "transform_for": "hub",
    "accelerate": "accel", "optimize": "accel",
    "list_models": "models", "model_config": "models",
    "HybridViT": "models.hybrid", "ResNetV2": "models.resnet", "VisionTransformer": "models.vit",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .accel import accelerate, optimize
    from .checkpoint import LoadedModel, save_model
    from .config import BiTConfig, HybridConfig, ViTConfig
    from .flops import count_flops
    from .hub import create_model, list_pretrained, load_model, transform_for
    from .models import list_models, model_config
    from .models.hybrid import HybridViT
    from .models.resnet import ResNetV2
    from .models.vit import VisionTransformer
