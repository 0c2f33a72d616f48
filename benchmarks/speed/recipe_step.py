"""A recipe's own training step (its model, optimizer, precision, batch) at each image size of
its resizing schedule: seconds per step, A/B of memory formats interleaved, and where the time goes.

    python benchmarks/speed/recipe_step.py                       # cifar10, sizes 16 24 32, 2 threads
    python benchmarks/speed/recipe_step.py --profile --sizes 16  # plus the op kinds (torch.profiler)

Variants: the conv stem on "NCHW" images (as the loader gives them) and on "channels-last" (NHWC,
oneDNN's native layout for convolutions; `vitlab.accel.STEM_CHANNELS_LAST`). Synthetic
images; the loader is not timed.
"""
import argparse
import itertools
import statistics

import torch

from vitlab.bench import Step, load_average, machine, time_interleaved
from vitlab import accel
from vitlab.models import build_model
from vitlab.optim import build_optimizer
from vitlab.recipes import recipe
from vitlab.train import forward_backward

VARIANTS = ("NCHW", "channels-last")


def make_step(name: str, size: int, variant: str) -> Step:
    """One optimizer step of ``vitlab.train``'s own forward/backward on a fixed synthetic batch."""
    cfg = recipe(name)
    torch.manual_seed(0)
    model = accel.accelerate(build_model(cfg.model_config(num_classes=10))).train()
    opt = build_optimizer(model, cfg.optim)
    batches = itertools.repeat((torch.randn(cfg.batch_size, 3, size, size), torch.randint(0, 10, (cfg.batch_size,))))

    def step():
        accel.STEM_CHANNELS_LAST = variant == "channels-last"
        opt.zero_grad(set_to_none=True)
        forward_backward(model, batches, cfg, torch.device("cpu"))
        opt.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="cifar10")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 24, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    where = ", ".join(f"{k} {v}" for k, v in machine().items())
    print(f"recipe {args.recipe}, {args.threads} threads, {args.rounds} interleaved rounds (median); {where}; "
          f"load average {load_average()}")
    for size in args.sizes:
        steps = {v: make_step(args.recipe, size, v) for v in VARIANTS}
        t = {v: statistics.median(calls) for v, calls in time_interleaved(steps, rounds=args.rounds, target_s=1.0).items()}
        base = t[VARIANTS[0]]
        print(f"{size} px: " + ", ".join(f"{v} {t[v] * 1e3:.0f} ms ({base / t[v]:.2f}x)" for v in VARIANTS), flush=True)
        if args.profile:
            from profile_step import by_kind  # noqa: PLC0415 (a sibling script)
            for v, step in steps.items():
                print(f"  {v}:")
                by_kind(step, top=8, indent="    ")


if __name__ == "__main__":
    main()
