"""What the whole training loop costs on top of the bare model step, in CPU time.

Runs ``vitlab.train.train`` (loader, augmentation, autocast, clipping, schedule, metrics) for
``--short`` and ``--long`` steps; the difference divided by the extra steps is the marginal
cost of one end-to-end step (set-up, the closing evaluation and checkpoint cancel out). The
bare step is the same model's forward + backward + optimiser step on random tensors. Both
run on one thread and are timed in process CPU time, so other work on a shared machine does
not move the ratio.

    python benchmarks/speed/train_overhead.py --data ../shared/data/cifar-10-batches-bin
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from vitlab.bench import Case, _build, make_inputs, machine
from vitlab.recipes import recipe
from vitlab.train import train
from vitlab.trainconfig import override


def loop_cpu_seconds(data: str, steps: int, base: str, batch: int) -> float:
    """Process CPU seconds of a whole ``vitlab.train`` run of ``steps`` steps."""
    cfg = override(recipe(base), path=data, steps=steps, batch_size=batch, threads=1, val_split=0.01,
                   eval_every=10**9, checkpoint_every=10**9, time_budget="")
    with tempfile.TemporaryDirectory() as run:
        start = time.process_time()
        train(cfg, run, log=lambda msg: None)
        return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 folder")
    p.add_argument("--recipe", default="cifar10", help="recipe whose model, augmentation and precision are used")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--short", type=int, default=5)
    p.add_argument("--long", type=int, default=25)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = recipe(args.recipe)
    print(f"machine: {machine()}")
    print(f"recipe {args.recipe}: {cfg.model}, {cfg.precision}, augmentation {cfg.data}")

    case = Case(model=cfg.model, batch=args.batch_size, dtype=cfg.precision, train=True)
    step = _build("vitlab", case, make_inputs(case))
    for _ in range(3):
        step()
    bare = []
    for _ in range(8):
        start = time.process_time()
        step()
        bare.append(time.process_time() - start)
    bare_s = statistics.median(bare)

    short = loop_cpu_seconds(args.data, args.short, args.recipe, args.batch_size)
    long = loop_cpu_seconds(args.data, args.long, args.recipe, args.batch_size)
    loop_s = (long - short) / (args.long - args.short)
    print(f"bare step (random tensors): {bare_s:.3f} CPU s = {args.batch_size / bare_s:.1f} images/CPU-s")
    print(f"vitlab.train, marginal step ({args.short} vs {args.long} steps): {loop_s:.3f} CPU s "
          f"= {args.batch_size / loop_s:.1f} images/CPU-s")
    print(f"end-to-end step costs {100 * (loop_s / bare_s - 1):+.1f}% against the bare step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
