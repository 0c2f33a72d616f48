"""The evidence for ``sdpa_is_faster``: SDPA against ``matmul_attention``, forward and forward+backward.

    python benchmarks/speed/attention.py [--threads 2] [--rounds 5]

Shapes are the benchmark's: CIFAR Ti/4 at batch 128, S/16 and B/16 at batch 32 and 1. Timed
round-robin in one process; the median over rounds, in ms per call.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vitlab.accel import matmul_attention

SHAPES = {"Ti/4 32px b128": (128, 3, 65), "S/16 b32": (32, 6, 197), "S/16 b1": (1, 6, 197),
          "B/16 b32": (32, 12, 197), "B/16 b1": (1, 12, 197)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| shape | dtype | pass | SDPA ms | matmul ms | SDPA / matmul |\n|---|---|---|---:|---:|---:|")
    for name, (b, h, n) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(b, h, n, 64, dtype=dtype, requires_grad=True) for _ in range(3))
            g = torch.randn(b, h, n, 64, dtype=dtype)
            fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                   "matmul": lambda: matmul_attention(q, k, v, 64**-0.5, torch.nn.Identity())}
            for label, train in (("forward", False), ("fwd+bwd", True)):
                times: dict[str, list[float]] = {k: [] for k in fns}
                for r in range(args.rounds + 1):
                    for key, fn in fns.items():
                        start = time.perf_counter()
                        with torch.set_grad_enabled(train):
                            out = fn()
                            if train:
                                out.backward(g)
                        if r:  # round 0 warms up
                            times[key].append(time.perf_counter() - start)
                s, m = (statistics.median(times[k]) * 1e3 for k in ("sdpa", "matmul"))
                print(f"| {name} | {str(dtype)[6:]} | {label} | {s:.2f} | {m:.2f} | {s / m:.2f} |")


if __name__ == "__main__":
    main()
