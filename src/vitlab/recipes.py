"""Named training recipes (``vitlab train --recipe NAME``): data, each with its source.

Any field can still be overridden on the command line (``--lr 3e-4 --depth 6``) or with
``vitlab.train.override(recipe("cifar10"), lr=3e-4)``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from .data import DataConfig
from .optim import OptimConfig
from .train import TrainConfig


@dataclass(frozen=True)
class Recipe:
    config: TrainConfig
    description: str
    source: str


# Paper Sec. 4.1 and Appendix B.1 (Table 3): Adam (beta1 0.9, beta2 0.999), batch 4096,
# 10k linear warm-up steps then linear decay, weight decay 0.1 ("high weight decay of 0.1,
# useful for transfer of all models"), dropout 0.1 (Table 3's ImageNet-21k rows, which list
# lr 1e-3 and 90 epochs for ViT-B), global-norm clipping at 1, 224 px, inception crop + flip.
# The official Flax Adam decays weights decoupled from the gradient, scaled by the lr: AdamW.
_PAPER_PRETRAIN = TrainConfig(
    model="vit_b16", model_overrides={"dropout": 0.1},
    data=DataConfig(crop="rrc", hflip=True, num_workers=8),
    optim=OptimConfig(optimizer="adamw", lr=1e-3, lr_batch_size=4096, weight_decay=0.1,
                      warmup_steps=10_000, schedule="linear", clip_grad_norm=1.0),
    batch_size=4096, epochs=90, precision="bf16")

RECIPES: dict[str, Recipe] = {
    "vit_paper_pretrain": Recipe(
        _PAPER_PRETRAIN,
        "ViT-B/16 pre-training as in the paper (lr 1e-3 at batch 4096, scaled to --batch-size)",
        "Dosovitskiy et al. 2020, Sec. 4.1 and Appendix B.1, Table 3 (ImageNet-21k rows)"),
    # Table 3's ImageNet row: 300 epochs, lr 3e-3, cosine decay, wd 0.3, dropout 0.1, clipping at 1.
    "vit_paper_imagenet": Recipe(
        replace(_PAPER_PRETRAIN, epochs=300,
                optim=replace(_PAPER_PRETRAIN.optim, lr=3e-3, weight_decay=0.3, schedule="cosine")),
        "ViT-B/16 from scratch on ImageNet-1k as in the paper (strong regularisation)",
        "Dosovitskiy et al. 2020, Appendix B.1, Table 3 (ImageNet row)"),
    # A first version for a small ViT from scratch on 32-px images; the paper has no such
    # setting. DeiT-style regularisation (Touvron et al. 2021): AdamW, lr 1e-3 at batch 512,
    # wd 0.05, cosine with 5% warm-up, RandAugment(2, 9), Mixup 0.8 / CutMix 1.0, label
    # smoothing 0.1, stochastic depth 0.1; long training because CIFAR-10 is small.
    "cifar10": Recipe(
        TrainConfig(
            model="vit_ti4_32px", model_overrides={"drop_path": 0.1},
            data=DataConfig(path="cifar10", randaugment_n=2, randaugment_m=9, mixup=0.8, cutmix=1.0),
            optim=OptimConfig(optimizer="adamw", lr=1e-3, lr_batch_size=512, weight_decay=0.05,
                              warmup_fraction=0.05, schedule="cosine", clip_grad_norm=1.0),
            batch_size=512, epochs=200, label_smoothing=0.1, precision="bf16"),
        "ViT-Ti/4 from scratch on CIFAR-10 (32 px): AdamW, RandAugment, Mixup/CutMix, cosine",
        "DeiT (Touvron et al. 2021) regularisation on a CIFAR-sized ViT; a starting point to tune"),
    # The README's main job: minutes on 2 CPU cores. Patch 8 (a 4 x 4 grid) trains about four
    # times faster than patch 4, which buys several epochs; light augmentation, as the run is short.
    # fp32: at width 128 the bf16 casts cost more than they save on a CPU (measured on 2 cores).
    "demo": Recipe(
        TrainConfig(
            model="vit_mu4_32px", model_overrides={"patch_size": 8},
            data=DataConfig(path="cifar10"),
            optim=OptimConfig(optimizer="adamw", lr=2e-3, weight_decay=0.05, warmup_fraction=0.05,
                              schedule="cosine", clip_grad_norm=1.0),
            batch_size=128, time_budget="4m", precision="fp32", eval_every=0),
        "ViT-Mu/8 (0.8M parameters) on CIFAR-10 for 4 minutes of training on a CPU",
        "this project: sized to run in minutes on 2 cores"),
    # Paper Sec. 3.2 and Appendix B.1.1 (Table 4); vit_jax/configs/common.py and input_pipeline.py:
    # SGD with momentum 0.9, no weight decay, global-norm clipping at 1, batch 512 (the official
    # code accumulates 8 micro-batches), 500 warm-up steps then cosine decay, 10k steps (CIFAR;
    # ImageNet 20k, Pets and Flowers 500, VTAB 2.5k), lr swept over {0.001, 0.003, 0.01, 0.03}
    # on a 2% minival; inception crop of area (0.05, 1) and flip. The model, its weights
    # (init_from) and the resolution come from `vitlab finetune` / `vitlab.transfer.finetune_config`.
    "finetune": Recipe(
        TrainConfig(
            model="vit_b16",
            data=DataConfig(crop="rrc", rrc_scale=(0.05, 1.0), hflip=True),
            optim=OptimConfig(optimizer="sgd", lr=0.03, momentum=0.9, weight_decay=0.0, warmup_steps=500,
                              schedule="cosine", clip_grad_norm=1.0),
            batch_size=512, accum_steps=8, steps=10_000, eval_every=1000, precision="bf16"),
        "fine-tuning as in the paper (used by `vitlab finetune`): SGD 0.9, no weight decay, warm-up 500, cosine",
        "Dosovitskiy et al. 2020, Sec. 3.2, Appendix B.1.1 and Table 4; vit_jax/configs/common.py"),
}


def recipe(name: str) -> TrainConfig:
    """The TrainConfig of the recipe ``name``; an unknown name lists the nearest ones."""
    if name not in RECIPES:
        near = difflib.get_close_matches(name, list(RECIPES), n=3, cutoff=0.4)
        raise ValueError(f"unknown recipe {name!r}; " + (f"did you mean {', '.join(near)}?" if near
                                                         else f"valid: {', '.join(RECIPES)}"))
    return RECIPES[name].config
