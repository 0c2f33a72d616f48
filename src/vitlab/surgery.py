"""Model surgery: load pre-trained weights into a new model, reset the head, resample the
position embeddings, freeze all but the last blocks (the paper's fine-tuning set-up, Sec. 3.2).
"""
from __future__ import annotations

import os

from torch import nn

from .checkpoint import load_state_dict_checked
from .config import replace_checked
from .hub import load_model


def adapt_model(model: nn.Module, *, num_classes: int, image_size: int | tuple[int, int] | None = None,
                posemb_mode: str = "scipy", keep_pre_logits: bool = False) -> nn.Module:
    """In place: a zero head for ``num_classes`` (pre-logits dropped unless kept), position
    embeddings resampled to ``image_size`` with ``posemb_mode`` (the model's cfg records it)."""
    model.reset_head(num_classes, keep_pre_logits=keep_pre_logits)
    model.set_image_size(image_size or model.cfg.image_size, mode=posemb_mode)
    if hasattr(model.cfg, "posemb_mode"):  # a BiT ResNet has no position embeddings
        model.cfg = replace_checked(model.cfg, posemb_mode=posemb_mode)
    return model


def load_pretrained(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Copy a checkpoint's weights into ``model`` (a fresh model of the fine-tuning config),
    adapting the checkpoint's head and position embeddings to ``model``'s classes and grid."""
    source = load_model(checkpoint).model
    cfg = model.cfg
    adapt_model(source, num_classes=cfg.num_classes, image_size=cfg.image_size,
                posemb_mode=getattr(cfg, "posemb_mode", "scipy"),
                keep_pre_logits=bool(getattr(cfg, "representation_size", None)))
    load_state_dict_checked(model, source.state_dict(), source=f"pre-trained checkpoint {checkpoint}")


def freeze(model: nn.Module, train_blocks: int) -> None:
    """Train only the last ``train_blocks`` blocks (a ViT's encoder blocks, a ResNet's residual
    units), the final norm and the head (0: the head and pre-logits only, a frozen backbone;
    -1: everything)."""
    if train_blocks < 0:
        model.requires_grad_(True)
        return
    units = list(model.blocks) if hasattr(model, "blocks") else [u for stage in model.stages for u in stage]
    if train_blocks > len(units):
        raise ValueError(f"train_blocks {train_blocks} exceeds the model's {len(units)} blocks; use at most "
                         f"{len(units)} (or -1 to train everything)")
    model.requires_grad_(False)
    trained = [model.head, getattr(model, "pre_logits", nn.Identity())]
    if train_blocks:
        trained += [model.norm, *units[len(units) - train_blocks:]]
    for module in trained:
        module.requires_grad_(True)
