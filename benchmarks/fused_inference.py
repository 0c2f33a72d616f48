"""A/B: bf16 inference with and without `vitlab.models.vit.fused_linear`, interleaved, 2 threads.

    python benchmarks/fused_inference.py            # median time per path and case, speed-up
    python benchmarks/fused_inference.py --memory   # peak RSS of ViT-S/16 batch 32, 4 processes per path

The eager path is the same model with `fusable` switched off.
"""
import statistics
import subprocess
import sys
import time

import torch

import vitlab
from vitlab.bench import steady_peak_rss
from vitlab.models import vit

torch.set_num_threads(2)
FUSABLE = vit.fusable


def use(mode: str) -> None:
    vit.fusable = FUSABLE if mode == "fused" else (lambda *a: False)


def timing(name: str, batch: int, rounds: int = 7) -> None:
    model = vitlab.optimize(vitlab.create_model(name), torch.bfloat16)
    x = torch.randn(batch, 3, 224, 224)
    times: dict[str, list[float]] = {"eager": [], "fused": []}
    repeat = 3 if batch == 1 else 1
    with torch.inference_mode():
        for r in range(rounds + 1):  # round 0 warms up
            for mode in times:
                use(mode)
                start = time.perf_counter()
                for _ in range(repeat):
                    model(x)
                if r:
                    times[mode].append((time.perf_counter() - start) / repeat)
    use("fused")
    e, f = statistics.median(times["eager"]), statistics.median(times["fused"])
    print(f"{name} batch {batch}: eager {e * 1e3:.1f} ms, fused {f * 1e3:.1f} ms, speed-up {e / f:.3f}x", flush=True)


def peak_rss(mode: str) -> None:
    """One process: ViT-S/16 batch 32; prints the peak RSS in MiB of a forward after a warm-up one
    (the peak is reset in between, as `vitlab bench` does: the steady state, not the model build)."""
    use(mode)
    model = vitlab.optimize(vitlab.create_model("vit_s16"), torch.bfloat16)
    x = torch.randn(32, 3, 224, 224)
    with torch.inference_mode():
        print(steady_peak_rss(lambda: model(x)) // 2**20)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rss"]:
        peak_rss(sys.argv[2])
    elif sys.argv[1:2] == ["--memory"]:
        rss: dict[str, list[int]] = {"eager": [], "fused": []}
        for _ in range(4):
            for mode in rss:
                out = subprocess.run([sys.executable, __file__, "--rss", mode], capture_output=True, text=True,
                                     check=True).stdout
                rss[mode].append(int(out.split()[-1]))
        for mode, values in rss.items():
            print(f"vit_s16 batch 32 peak RSS, {mode}: {values} MiB, median {statistics.median(values):.0f}")
    else:
        for name, batch in [("vit_s16", 32), ("vit_s16", 1), ("vit_b16", 32), ("vit_b16", 1)]:
            timing(name, batch)
