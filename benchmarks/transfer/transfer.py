"""Does pre-training transfer? The paper's claim at CPU scale, in one command.

    PYTHONPATH=src nice -n 10 python benchmarks/transfer/transfer.py --cifar ../shared/data/cifar-10-batches-bin

Pre-trains a small ViT (ViT-Mu/8 at 32 px) on five CIFAR-10 classes (airplane, automobile, bird,
cat, deer), then transfers it to the other five (dog, frog, horse, ship, truck) using only a few
hundred labelled images per class:
- few-shot linear evaluation (the paper's ridge, 1/5/10/25 shots, 3 seeds) of the pre-trained
  features, against the same architecture's random-initialisation features;
- fine-tuning at a higher resolution (48 px: the position embeddings are resampled from 4x4 to
  6x6) with the paper's recipe scaled down (SGD momentum 0.9, no weight decay, warm-up + cosine,
  learning rate chosen on a held-out minival), against the same model trained from scratch on the same
  images for the same number of steps (AdamW, the project's from-scratch demo settings).
Everything goes through the library (``vitlab.train.train``, ``vitlab.transfer.finetune``,
``vitlab.fewshot.fewshot_checkpoint``). Prints a Markdown table; writes ``OUT/results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from vitlab import create_model, save_model
from vitlab.data import DataConfig
from vitlab.data.cifar import read_cifar
from vitlab.fewshot import fewshot_checkpoint
from vitlab.optim import OptimConfig
from vitlab.run import LAST_FILE
from vitlab.train import train
from vitlab.trainconfig import TrainConfig
from vitlab.transfer import finetune, finetune_config

PRETRAIN_CLASSES, TRANSFER_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
MODEL = "vit_mu4_32px"
MODEL_OVERRIDES = {"patch_size": 8}  # a 4 x 4 grid at 32 px: the demo recipe's ViT-Mu/8, 0.8M parameters


def write_folder(images: torch.Tensor, labels: torch.Tensor, names: list[str], classes: tuple[int, ...],
                 root: Path, per_class: int | None, seed: int) -> None:
    """PNG files ``root/<class>/<i>.png`` for ``classes``, the first ``per_class`` of a seeded order each."""
    g = torch.Generator().manual_seed(seed)
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)][:per_class]
        folder = root / names[c]
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx.tolist():
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")


def make_data(cifar: Path, out: Path, pretrain_per_class: int, transfer_per_class: int,
              test_per_class: int) -> tuple[Path, Path]:
    """Two image folders with train/ and test/: five classes to pre-train on, five to transfer to."""
    pre, tra = out / "pretrain", out / "transfer"
    if (out / "done").exists():
        return pre, tra
    train_set, test_set = read_cifar(cifar, "cifar10-binary")
    names = train_set.class_names
    write_folder(train_set.images, train_set.labels, names, PRETRAIN_CLASSES, pre / "train", pretrain_per_class, 0)
    write_folder(test_set.images, test_set.labels, names, PRETRAIN_CLASSES, pre / "test", test_per_class, 0)
    write_folder(train_set.images, train_set.labels, names, TRANSFER_CLASSES, tra / "train", transfer_per_class, 1)
    write_folder(test_set.images, test_set.labels, names, TRANSFER_CLASSES, tra / "test", test_per_class, 1)
    (out / "done").touch()
    return pre, tra


def scratch_config(data: Path, *, image_size: int, batch_size: int, threads: int, **length: float) -> TrainConfig:
    """The project's from-scratch settings for this model (the ``demo`` recipe's); ``length``: steps or epochs."""
    return TrainConfig(
        model=MODEL, model_overrides={**MODEL_OVERRIDES, "image_size": image_size},
        data=DataConfig(path=str(data), crop="pad"),
        optim=OptimConfig(optimizer="adamw", lr=2e-3, weight_decay=0.05, warmup_fraction=0.05, schedule="cosine"),
        batch_size=batch_size, threads=threads, precision="bf16", **length)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default="../shared/data/cifar-10-batches-bin", help="CIFAR-10 binary folder")
    p.add_argument("--out", default="runs/bench-transfer")
    p.add_argument("--pretrain-per-class", type=int, default=1000, help="pre-training images per class")
    p.add_argument("--pretrain-epochs", type=float, default=2.0)
    p.add_argument("--transfer-per-class", type=int, default=100, help="labelled images per new class")
    p.add_argument("--test-per-class", type=int, default=200, help="test images per class (both halves)")
    p.add_argument("--finetune-size", type=int, default=48, help="fine-tuning resolution (pre-training: 32)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning and from-scratch steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", default="0.01,0.03", help="fine-tuning learning rates to sweep")
    p.add_argument("--minival", type=float, default=0.1,
                   help="share of the transfer training set that chooses the lr (the paper's 2%% of 500 images "
                        "would be 10)")
    p.add_argument("--shots", default="1,5,10,25")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    times: dict[str, float] = {}
    start = tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        times[name] = round(time.perf_counter() - tick, 1)
        tick = time.perf_counter()

    pre_data, transfer_data = make_data(Path(args.cifar), out / "data", args.pretrain_per_class,
                                        args.transfer_per_class, args.test_per_class)
    lap("data")

    # 1. pre-train on the first five classes (the demo recipe's settings)
    pre_steps = round(args.pretrain_epochs * 5 * args.pretrain_per_class / args.batch_size)
    pre = train(scratch_config(pre_data, image_size=32, batch_size=args.batch_size, threads=args.threads,
                               steps=pre_steps, eval_every=pre_steps), out / "pretrain")
    pretrained = out / "pretrain" / LAST_FILE
    lap("pretrain")

    # 2. few-shot on the other five: pre-trained features against random-initialisation features
    torch.manual_seed(0)
    random_init = save_model(create_model(MODEL, num_classes=5, **MODEL_OVERRIDES), out / "random_init.safetensors")
    shots = [int(s) for s in args.shots.split(",")]
    fewshot = {name: fewshot_checkpoint(str(ckpt), str(transfer_data), shots=shots, seeds=3,
                                        cache_dir=str(out / "features"), progress=False)
               for name, ckpt in (("pretrained", pretrained), ("random_init", random_init))}
    lap("fewshot")

    # 3. fine-tune at a higher resolution with an lr sweep on a 2% minival, then on all of train
    lrs = [float(v) for v in args.lr.split(",")]
    ft_cfg = finetune_config(pretrained, str(transfer_data), image_size=args.finetune_size, steps=args.steps,
                             batch_size=args.batch_size, accum_steps=1, warmup_steps=max(1, args.steps // 20),
                             eval_every=args.steps, crop="pad", threads=args.threads)
    ft = finetune(ft_cfg, out / "finetune", lrs, minival=args.minival)
    lap("finetune")

    # 4. the same model from scratch on the same images, for the same number of steps
    scratch = train(scratch_config(transfer_data, image_size=args.finetune_size, batch_size=args.batch_size,
                                   threads=args.threads, steps=args.steps, eval_every=args.steps), out / "scratch")
    lap("scratch")
    total = time.perf_counter() - start

    rows = []
    for k_index, k in enumerate(shots):
        a, b = fewshot["pretrained"].ridge[k_index], fewshot["random_init"].ridge[k_index]
        rows.append((f"{k}-shot linear (ridge, 3 seeds)", f"{100 * a.mean:.1f} ± {100 * a.std:.1f}",
                     f"{100 * b.mean:.1f} ± {100 * b.std:.1f} (random init)"))
    rows.append((f"{args.steps} steps at {args.finetune_size} px, {args.transfer_per_class} images/class",
                 f"{100 * ft.test_top1:.1f} (fine-tuned, lr {ft.lr:g})",
                 f"{100 * scratch.eval['eval_top1']:.1f} (from scratch)"))
    command = "PYTHONPATH=src nice -n 10 python " + " ".join([sys.argv[0], *sys.argv[1:]])
    lines = [
        f"Pre-training: ViT-Mu/8 at 32 px, {pre.step} steps of {args.batch_size} on {5 * args.pretrain_per_class} "
        f"images of 5 classes: test top-1 {100 * pre.eval['eval_top1']:.1f}% (5-way). Transfer: "
        f"{args.transfer_per_class} labelled images per new class; {5 * args.test_per_class} test images.",
        "",
        "| 5 new classes, test top-1 (%) | pre-trained on the other 5 | no pre-training |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Fine-tuning lr sweep ({100 * args.minival:g}% minival top-1): "
        + ", ".join(f"{s['lr']:g}: {100 * s['minival_top1']:.0f}%" for s in ft.sweep) + ".",
        f"Wall time {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
        f"torch {torch.__version__}.",
        f"Command: `{command}`",
    ]
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps({
        "args": vars(args), "times_s": times, "total_s": round(total, 1),
        "pretrain_top1": pre.eval["eval_top1"],
        "fewshot": {name: r.to_dict() for name, r in fewshot.items()},
        "finetune": {"lr": ft.lr, "sweep": ft.sweep, "test_top1": ft.test_top1},
        "scratch_top1": scratch.eval["eval_top1"], "table": lines}, indent=2) + "\n")


if __name__ == "__main__":
    main()
