"""A/B: bf16 inference with and without `vitlab.accel.fused_linear`, interleaved, 2 threads.

    python benchmarks/speed/fused_inference.py            # eager vs fused: median time per path and case, speed-up
    python benchmarks/speed/fused_inference.py --qkv      # fused, with qkv through F.linear (addmm) vs fused
    python benchmarks/speed/fused_inference.py --prepack  # fused vs fused on prepacked (oneDNN-blocked) weights
    python benchmarks/speed/fused_inference.py --memory   # peak RSS of ViT-S/16 batch 32, 4 processes per path

The eager path is the same model with `fusable` switched off; "qkv eager" sends the qkv projection
(the one fused call without GELU or residual) through `nn.Linear`; "prepacked" replaces the Linear
weights of the blocks by `torch.ops.mkldnn._reorder_linear_weight` copies (an experiment: such a
model has no state dict or eager path).
"""
import statistics
import subprocess
import sys
import time

import torch

import vitlab
from vitlab.bench import steady_peak_rss
from vitlab import accel

torch.set_num_threads(2)
FUSABLE, FUSED_LINEAR = accel.fusable, accel.fused_linear


def use(mode: str) -> None:
    accel.fusable = (lambda *a: False) if mode == "eager" else FUSABLE
    accel.fused_linear = (lambda x, layer, **k: FUSED_LINEAR(x, layer, **k) if k else layer(x)) \
        if mode == "qkv eager" else FUSED_LINEAR


def prepacked(model: torch.nn.Module, rows: int) -> torch.nn.Module:
    """``model`` with its blocks' Linear weights reordered once for ``rows`` input rows."""
    for block in model.blocks:
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows)
            del layer.weight
            layer.weight = weight
    return model


def timing(name: str, batch: int, modes: tuple[str, str], rounds: int = 7) -> None:
    build = lambda: vitlab.optimize(vitlab.create_model(name), torch.bfloat16)  # noqa: E731
    models = {mode: prepacked(build(), batch * 197) if mode == "prepacked" else build() for mode in modes}
    x = torch.randn(batch, 3, 224, 224)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    repeat = 3 if batch == 1 else 1
    with torch.inference_mode():
        for r in range(rounds + 1):  # round 0 warms up
            for mode, model in models.items():
                use(mode)
                start = time.perf_counter()
                for _ in range(repeat):
                    model(x)
                if r:
                    times[mode].append((time.perf_counter() - start) / repeat)
    use("fused")
    a, b = (statistics.median(times[mode]) for mode in modes)
    print(f"{name} batch {batch}: {modes[0]} {a * 1e3:.1f} ms, {modes[1]} {b * 1e3:.1f} ms, "
          f"speed-up {a / b:.3f}x", flush=True)


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
        modes = {"--qkv": ("qkv eager", "fused"), "--prepack": ("fused", "prepacked")}.get(
            sys.argv[1] if sys.argv[1:] else "", ("eager", "fused"))
        for name, batch in [("vit_s16", 32), ("vit_s16", 1), ("vit_b16", 32), ("vit_b16", 1)]:
            timing(name, batch, modes)
