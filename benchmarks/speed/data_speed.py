"""Images/s of the CIFAR training loader with augmentation on, against a model step alone.

    PYTHONPATH=src python benchmarks/speed/data_speed.py [--data ../shared/data/cifar-10-batches-bin]

Prints the loader's throughput for a few augmentation settings, then the training step of a
small ViT (forward + backward + AdamW) on fixed batches, so the two can be compared: the input
pipeline costs ``step_time / (step_time + loader_time)`` of end-to-end throughput.
"""
from __future__ import annotations

import argparse
import time

import torch

from vitlab import create_model
from vitlab.data import DataConfig, Loader, build_data


def loader_speed(train, cfg: DataConfig, batch_size: int, batches: int) -> float:
    loader = Loader(train, cfg, batch_size=batch_size, train=True, num_classes=10)
    it = loader.epoch(0)
    next(it)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def step_speed(model_name: str, batch_size: int, steps: int) -> float:
    model = create_model(model_name, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar-10-batches-bin")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--model", default="vit_ti4_32px")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = build_data(DataConfig(path=args.data)).train
    settings = {
        "pad-crop + flip": DataConfig(path=args.data),
        "+ RandAugment(2, 9)": DataConfig(path=args.data, randaugment_n=2),
        "+ RandAugment(2, 9) + Mixup/CutMix": DataConfig(path=args.data, randaugment_n=2, mixup=0.8, cutmix=1.0),
        "rrc + flip": DataConfig(path=args.data, crop="rrc"),
    }
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch_size}")
    step = step_speed(args.model, args.batch_size, 3)
    print(f"{args.model} train step alone: {step:10.0f} images/s")
    for name, cfg in settings.items():
        speed = loader_speed(train, cfg, args.batch_size, args.batches)
        loss = step / (step + speed)  # fraction of end-to-end throughput lost to the loader
        print(f"loader, {name:<36}{speed:10.0f} images/s  (end-to-end loss vs step alone: {loss:.1%})")


if __name__ == "__main__":
    main()
