"""A/B: bf16 inference with and without `vitlab.models.vit.fused_linear`, interleaved rounds, 2 threads.

    python benchmarks/fused_inference.py

Prints the median time of each path per case and the speed-up (eager / fused)."""
import statistics, sys, time, torch, vitlab
from vitlab.models import vit
torch.set_num_threads(2)
fus = vit.fusable
def run(name, b, rounds=7):
    m = vitlab.optimize(vitlab.create_model(name), torch.bfloat16)
    x = torch.randn(b, 3, 224, 224)
    t = {"eager": [], "fused": []}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for mode in ("eager", "fused"):
                vit.fusable = fus if mode == "fused" else (lambda *a: False)
                n = 3 if b == 1 else 1
                s = time.perf_counter()
                for _ in range(n): m(x)
                if r: t[mode].append((time.perf_counter() - s) / n)
    vit.fusable = fus
    e, f = statistics.median(t["eager"]), statistics.median(t["fused"])
    print(f"{name} b{b}: eager {e*1e3:.1f} ms, fused {f*1e3:.1f} ms, speedup {e/f:.3f}x", flush=True)
for name, b in [("vit_s16", 32), ("vit_s16", 1), ("vit_b16", 32), ("vit_b16", 1)]:
    run(name, b)
