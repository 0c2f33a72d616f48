"""Performance versus pre-training compute (the paper's Fig. 5) at CPU scale: ViT and BiT on CIFAR-10.

    nice -n 10 python benchmarks/compute/compare.py            # the default study, ~15 min on 2 CPU cores

Every (model, budget) pair trains from scratch through ``vitlab.train.train`` (the loop behind
``vitlab train``) on the same subset of CIFAR-10 with the same recipe, and is evaluated on the
same test images. A budget is a number of training images seen (steps x batch size), so

    training FLOPs = 3 x forward FLOPs per image (``vitlab.count_flops``, exact) x images seen

(the backward pass counted as twice the forward, the usual convention; matmuls and convolutions
only, as ``torch.utils.flop_counter``). Writes the runs and ``results.json`` under ``--out``,
a PNG (``--plot``) and the "Performance versus compute" section of ``--results`` (its folder's README.md);
both are rewritten after every run, so a stopped study keeps what it finished.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import vitlab  # noqa: E402
from vitlab import checkpoint  # noqa: E402
from vitlab.data import DataConfig  # noqa: E402
from vitlab.data.cifar import RECORD_PIXELS  # noqa: E402
from vitlab.models import ResNetV2, build_model, get_spec  # noqa: E402
from vitlab.models.hybrid import HybridViT  # noqa: E402
from vitlab.optim import OptimConfig  # noqa: E402
from vitlab.train import train  # noqa: E402
from vitlab.trainconfig import TrainConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
CIFAR = Path("/work/shared/data/cifar-10-batches-bin")
MODELS = ("vit_mu8_32px", "vit_mu4_32px", "bit_r26x1_32px", "bit_r26x2_32px")
BUDGETS = (768, 3072)  # training images seen (24 and 96 steps of 32)
START, END = "<!-- compare:start -->", "<!-- compare:end -->"


def write_subset(src: Path, dst: Path, train_images: int, test_images: int) -> Path:
    """A CIFAR-10 binary folder with the first ``train_images / 5`` records of each training batch
    and the first ``test_images`` test records (each training batch is close to class-balanced)."""
    record = 1 + RECORD_PIXELS
    if train_images % 5 or not 0 < train_images <= 50_000 or not 0 < test_images <= 10_000:
        raise ValueError(f"--train-images must be a multiple of 5 in (0, 50000] and --test-images in (0, 10000], "
                         f"got {train_images} and {test_images}")
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (dst / f"data_batch_{i}.bin").write_bytes((src / f"data_batch_{i}.bin").read_bytes()[: record * train_images // 5])
    (dst / "test_batch.bin").write_bytes((src / "test_batch.bin").read_bytes()[: record * test_images])
    if (src / "batches.meta.txt").exists():
        shutil.copyfile(src / "batches.meta.txt", dst / "batches.meta.txt")
    return dst


def study_config(model: str, steps: int, data: Path, batch_size: int) -> TrainConfig:
    """The one recipe every model trains with: AdamW, 10% warm-up, cosine, pad-crop + flip, fp32."""
    return TrainConfig(model=model, data=DataConfig(path=str(data)), batch_size=batch_size, steps=steps,
                       eval_every=steps, checkpoint_every=steps, precision="fp32", seed=0,
                       optim=OptimConfig(lr=1e-3, weight_decay=0.05, warmup_fraction=0.1, schedule="cosine"))


def family(model: torch.nn.Module) -> str:
    if isinstance(model, HybridViT):
        return "hybrid"
    return "BiT" if isinstance(model, ResNetV2) else "ViT"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def vitlab_version() -> str:
    try:
        version = importlib.metadata.version("vitlab")
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    return f"{version} (git {commit.strip() or 'unknown'})"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def plot(rows: list[dict], path: Path) -> Path:
    """Test top-1 against training FLOPs, one line per model (ViT blue, BiT red, hybrid green)."""
    colours = {"ViT": plt.cm.Blues, "BiT": plt.cm.Reds, "hybrid": plt.cm.Greens}
    markers = {"ViT": "o", "BiT": "s", "hybrid": "^"}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, name in enumerate(models):
        runs = sorted((r for r in rows if r["model"] == name), key=lambda r: r["train_flops"])
        fam = runs[0]["family"]
        same = [m for m in models if next(r for r in rows if r["model"] == m)["family"] == fam]
        colour = colours[fam](0.45 + 0.5 * same.index(name) / max(len(same) - 1, 1))
        ax.plot([r["train_flops"] for r in runs], [100 * r["test_top1"] for r in runs], marker=markers[fam],
                color=colour, label=f"{name} ({runs[0]['gflops']:.3f} GFLOPs/img)")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (3 x forward FLOPs x images seen)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("CIFAR-10 subset: accuracy versus training compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def section(rows: list[dict], info: dict, planned: int, png: Path, results: Path) -> str:
    """The markdown section (between the compare markers) for ``rows``."""
    lines = [START, "## Performance versus compute (`benchmarks/compute/compare.py`)", "",
             "The paper's Fig. 5 at CPU scale: ViT and BiT ResNet-v2 trained from scratch on the same CIFAR-10 "
             "subset with one recipe (AdamW lr 1e-3, weight decay 0.05, 10% warm-up, cosine decay, clipping at 1, "
             f"pad-crop + flip, fp32, batch {info['batch_size']}, seed 0), each for a few budgets of training "
             "images, and evaluated on the same test images. Training FLOPs = 3 x forward FLOPs per image "
             "(`vitlab.count_flops`: exact matmul and convolution FLOPs, a multiply-add counts 2) x images seen.", "",
             f"- command: `{info['command']}`",
             f"- data: the first {info['train_images']:,} training images ({info['train_images'] // 5:,} from each "
             f"batch) and the first {info['test_images']:,} test images of CIFAR-10",
             f"- machine: {info['machine']}; shared with other work while it ran "
             f"(`uptime` before: `{info['uptime_before']}`; after: `{info.get('uptime_after', 'n/a (still running)')}`)",
             f"- versions: Python {info['python']}, torch {info['torch']}, vitlab {info['vitlab']}",
             f"- date: {info['date']}; wall time {info.get('wall_s', float('nan')):.0f} s", ""]
    if len(rows) < planned:
        lines += [f"**Partial: {len(rows)} of {planned} runs finished.**", ""]
    lines += ["| model | family | params | GFLOPs / image | images seen | steps | training FLOPs | test top-1 | "
              "train time (s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["model"], r["images_seen"])):
        lines.append(f"| `{r['model']}` | {r['family']} | {r['params']:,} | {r['gflops']:.4f} | {r['images_seen']:,} | "
                     f"{r['steps']} | {r['train_flops']:.3e} | {100 * r['test_top1']:.2f}% | {r['train_s']:.0f} |")
    rel = os.path.relpath(png, results.parent)
    lines += ["", f"![accuracy versus training FLOPs]({rel})", "",
              "Times are wall-clock on shared cores and only indicative; the FLOPs and accuracies are what the "
              "study compares. At this scale the runs are far from converged: read the trend, not the levels.",
              END]
    return "\n".join(lines) + "\n"


def write_section(results: Path, text: str) -> None:
    """Replace the compare section of ``results`` (or append it), leaving every other section alone."""
    checkpoint.write_section(results, text, START, END, title="# Benchmark results\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=CIFAR, help="CIFAR-10 binary folder (cifar-10-batches-bin)")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="presets of `vitlab models`")
    p.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS), help="training images seen per run")
    p.add_argument("--train-images", type=int, default=10_000, help="training subset size (a multiple of 5)")
    p.add_argument("--test-images", type=int, default=2_000, help="test images to evaluate on")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="runs, data subset and results.json")
    p.add_argument("--plot", type=Path, default=HERE / "compare.png")
    p.add_argument("--results", type=Path, default=HERE / "README.md")
    args = p.parse_args(argv)

    for name in args.models:
        get_spec(name)  # an unknown preset fails before any training
    if min(args.budgets) < args.batch_size:
        raise SystemExit(f"compare: every budget must be at least one batch ({args.batch_size} images)")
    start = time.perf_counter()
    niceness = f"nice -n {os.nice(0)} " if os.nice(0) else ""
    info = {"command": niceness + " ".join(["python benchmarks/compute/compare.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(), "uptime_before": uptime(), "python": platform.python_version(),
            "torch": torch.__version__, "vitlab": vitlab_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "train_images": args.train_images, "test_images": args.test_images, "batch_size": args.batch_size}
    print(f"uptime before: {info['uptime_before']}", flush=True)
    data = write_subset(args.data, args.out / "data" / "cifar-10-batches-bin", args.train_images, args.test_images)
    rows: list[dict] = []
    planned = len(args.models) * len(args.budgets)
    for budget in sorted(args.budgets):
        for name in args.models:
            steps = budget // args.batch_size
            cfg = study_config(name, steps, data, args.batch_size)
            model = build_model(cfg.model_config(num_classes=10))
            run_dir = args.out / f"{name}-{steps * args.batch_size}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            tick = time.perf_counter()
            result = train(cfg, run_dir)
            gflops = vitlab.count_flops(model) / 1e9
            rows.append({"model": name, "family": family(model), "params": sum(q.numel() for q in model.parameters()),
                         "gflops": gflops, "steps": steps, "images_seen": steps * args.batch_size,
                         "train_flops": 3 * gflops * 1e9 * steps * args.batch_size,
                         "test_top1": result.eval["eval_top1"], "train_s": time.perf_counter() - tick})
            info["wall_s"] = time.perf_counter() - start
            (args.out / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
            png = plot(rows, args.plot)
            write_section(args.results, section(rows, info, planned, png, args.results))
    info["uptime_after"] = uptime()
    info["wall_s"] = time.perf_counter() - start
    print(f"uptime after: {info['uptime_after']}", flush=True)
    (args.out / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    write_section(args.results, section(rows, info, planned, plot(rows, args.plot), args.results))
    print(f"wrote {args.plot} and the compare section of {args.results} ({len(rows)} runs, {info['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
