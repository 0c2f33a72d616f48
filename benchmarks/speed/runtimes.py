"""vitlab against the CPU runtimes people deploy ViTs on: ONNX Runtime and OpenVINO, fp32, bf16, INT8.

    python benchmarks/speed/runtimes.py [--rounds 3] [--data ../shared/data/cifar-10-batches-bin]

One interleaved `vitlab bench` run (every variant of a case timed round-robin in one process, with
the matmul peak) over ViT-S/16 and ViT-B/16 at batch 1 (latency: p50 and p90 of every call) and 32
(throughput), peak RSS per variant in the bf16 cases; vitlab eager fp32 and bf16 (its fast path)
and its INT8 (torch.ao dynamic), timm and transformers, ONNX Runtime fp32 and dynamic INT8,
OpenVINO fp32, bf16 and NNCF INT8 (calibrated on random images: timing only). With ``--data``
the INT8 exports' accuracy cost on the shipped CIFAR-10 model's test set is measured too.
Writes benchmarks/speed/runtimes.md and runtimes.png.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vitlab import bench, load_model  # noqa: E402
from vitlab.deploy import check_export, export, load_exported, take  # noqa: E402
from vitlab.evaluate import split_loader  # noqa: E402

HERE = Path(__file__).resolve().parent
CASES = tuple(bench.Case(model=m, batch=b, dtype=d) for m, b, d in (
    ("vit_s16", 1, "fp32"), ("vit_s16", 1, "bf16"), ("vit_s16", 32, "fp32"), ("vit_s16", 32, "bf16"),
    ("vit_b16", 1, "bf16"), ("vit_b16", 32, "bf16")))
SHIPPED = "vit_conv_32px.vitlab_cifar10"


def plot(results: list[bench.CaseResult], path: Path) -> None:
    """Images/s of every variant, one panel per case, vitlab's bars in blue."""
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4.5))
    for ax, res in zip(axes, results):
        names = [r.variant for r in res.rows]
        rates = [res.case.batch / r.seconds for r in res.rows]
        ax.barh(names, rates, color=["tab:blue" if n.startswith("vitlab") else "tab:gray" for n in names])
        ax.invert_yaxis()
        ax.set_title(res.case.name.replace(" inference", "\n"), fontsize=9)
        ax.set_xlabel("images/s")
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def accuracy(data: str) -> str:
    """The INT8 exports of the shipped model against its fp32 self on the whole test set."""
    loaded = load_model(SHIPPED)
    calib_loader, _, _ = split_loader(loaded, data, "train", batch_size=64, log=lambda m: None)
    calibration = __import__("torch").cat([x for x, _ in take(calib_loader.epoch(0), 300)])
    test, split, _ = split_loader(loaded, data, None, batch_size=256, log=lambda m: None)
    lines = [f"#### INT8's cost: `{SHIPPED}`, the whole {split} split of {data}, no TTA", "",
             "| export | top-1 | top-1 of PyTorch fp32 | points | top-1 agreement | max abs logit diff |",
             "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for runtime, suffix in (("onnxruntime", ".onnx"), ("openvino", ".xml")):
            path = export(loaded, f"{tmp}/q{suffix}", to=runtime, int8=True, calibration=calibration, check=False)
            c = check_export(loaded.model, load_exported(path).model, take(test.epoch(0), 0))
            lines.append(f"| {runtime} INT8 | {100 * c.top1:.2f}% | {100 * c.reference_top1:.2f}% | "
                         f"{100 * (c.top1 - c.reference_top1):+.2f} | {100 * c.agreement:.2f}% | {c.max_logit_diff:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default="", help="only cases whose name contains one of these comma-separated parts")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--data", help="CIFAR-10: also measure INT8's accuracy cost on the shipped model")
    args = p.parse_args()
    cases = tuple(c for c in CASES if any(part in c.name for part in args.cases.split(",")))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = bench.run(cases, rounds=args.rounds, target_s=0.5, threads=args.threads, compile=False,
                       memory=not args.no_memory, runtimes=True, log=log)
    command = "python benchmarks/speed/runtimes.py " + " ".join(sys.argv[1:])
    text = f"# vitlab against the CPU runtimes\n\n`{command.strip()}`\n\n{report.text}\n![images/s](runtimes.png)\n"
    if args.data:
        text += "\n" + accuracy(args.data)
    plot(report.results, HERE / "runtimes.png")
    (HERE / "runtimes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
