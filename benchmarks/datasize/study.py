"""Data size (the paper's Sec. 4.3, Figs. 3-4) at CPU scale: a ViT and a BiT ResNet of similar compute,
pre-trained on growing subsets of CIFAR-10, then transferred to held-out classes.

    python benchmarks/datasize/study.py --threads 2          # the full study (hours on 2 CPU cores)
    python benchmarks/datasize/study.py --dry-run            # print every command, run nothing

Pre-training: classes 0-4 of CIFAR-10 (airplane, automobile, bird, cat, deer), a class-balanced
subset of each size (``vitlab train --classes 0 1 2 3 4 --train-subset N``; the subsets are nested),
the same number of epochs for every size, one recipe for both families. Transfer to classes 5-9
(dog, frog, horse, ship, truck): few-shot linear evaluation of the frozen ``pre_logits``
(``vitlab fewshot --classes 5 6 7 8 9``, the paper's ridge) on their 5,000 test images, and
fine-tuning on 1,000 of their training images (``vitlab finetune --classes 5 6 7 8 9
--train-subset 1000``) tested on the same 5,000. The randomly initialised models of both families
are the "0 images" reference. Each pre-trained model's own test top-1 (classes 0-4) is recorded too.

Every step is a `vitlab` command, printed before it runs (in this process, through
``vitlab.cli.main``); each run has its own folder under ``--out`` and a ``result_*.json`` once it
finished. Run the study again to continue: finished runs are skipped, a stopped training
continues with ``vitlab train --resume``. After every model ``--json``, the PNG (``--plot``) and
the section of ``--results`` between the datasize markers are rewritten from the finished runs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import vitlab  # noqa: E402
from vitlab.checkpoint import write_section  # noqa: E402
from vitlab.cli import main as vitlab_main  # noqa: E402
from vitlab.models import build_model, get_spec  # noqa: E402
from vitlab.config import replace_checked  # noqa: E402
from vitlab.options import flag  # noqa: E402
from vitlab.run import CONFIG_FILE, METRICS_FILE, STATE_FILE, read_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent
PRETRAIN_CLASSES, TRANSFER_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
START, END = "<!-- datasize:start -->", "<!-- datasize:end -->"


class Family(NamedTuple):
    """One model family: a preset of `vitlab models` and its overrides."""

    name: str  # "ViT" or "BiT"
    model: str
    overrides: dict[str, Any]
    description: str

    def options(self) -> list[str]:
        """The model as `vitlab train` options: ``--model NAME --width 192 --layers 3 3 2 2 ...``."""
        argv = ["--model", self.model]
        for key, value in self.overrides.items():
            if isinstance(value, bool):
                argv.append(flag(key) if value else "--no-" + flag(key)[2:])
            else:
                argv += [flag(key), *map(str, value if isinstance(value, tuple) else (value,))]
        return argv

    def build(self, num_classes: int) -> torch.nn.Module:
        return build_model(replace_checked(get_spec(self.model).config, num_classes=num_classes, **self.overrides))


# Similar forward compute at 32 px (vitlab.count_flops, 5 classes): the ViT 0.251 GFLOPs and 1.81M
# parameters; the BiT 0.246 GFLOPs and 2.02M parameters (README.md).
FAMILIES = {
    "ViT": Family("ViT", "vit_mu4_32px", {"width": 192, "depth": 6, "mlp_dim": 384, "num_heads": 3},
                  "plain ViT: linear 4 x 4 patches, class token, width 192, depth 6, MLP 384, 3 heads "
                  "(the cifar10_plain recipe's model)"),
    "BiT": Family("BiT", "bit_r26x1_32px", {"layers": (3, 3, 2, 2), "stem_width": 24, "stem_stride": 1},
                  "BiT ResNet-v2 R32 (units 3, 3, 2, 2; GroupNorm + weight standardisation), stem width 24, "
                  "3 x 3 stride-1 stem, no max-pool: stages at 32, 16, 8, 4 px"),
}
TINY_FAMILIES = {  # for the test: trains in milliseconds
    "ViT": Family("ViT", "vit_mu4_32px", {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2}, "tiny ViT"),
    "BiT": Family("BiT", "bit_r26x1_32px", {"layers": (1, 1), "stem_width": 8, "num_groups": 4}, "tiny BiT"),
}
FULL = dict(sizes=[2500, 5000, 10000, 25000], epochs=15.0, batch_size=128, shots="1,5,10,25", seeds=3,
            finetune_images=1000, finetune_steps=100, finetune_warmup=10, precision="bf16", checkpoint_every=200)
TINY = dict(sizes=[10, 20], epochs=2.0, batch_size=8, shots="1,2", seeds=1, finetune_images=10, finetune_steps=2,
            finetune_warmup=1, precision="fp32", checkpoint_every=1)


# ---------------------------------------------------------------- running vitlab commands

class Runner:
    """Prints and runs `vitlab` commands in this process; ``dry``: prints only."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry

    def __call__(self, argv: list[str], *, capture: bool = False) -> str:
        argv = [str(a) for a in argv]
        print(f"\n$ vitlab {shlex.join(argv)}", flush=True)
        if self.dry:
            return ""
        out = io.StringIO()
        with contextlib.redirect_stdout(out) if capture else contextlib.nullcontext():
            code = vitlab_main(argv)
        if code:
            again = "run the study again to continue" if code >= 128 else "fix the cause, then run the study again"
            raise SystemExit(f"study: `vitlab {argv[0]}` stopped with exit code {code}; {again} (finished runs "
                             f"are kept)")
        return out.getvalue()


def final_eval(run: Path) -> dict[str, Any]:
    """The evaluation a finished run wrote at its last step (metrics.jsonl)."""
    steps = json.loads((run / CONFIG_FILE).read_text())["train"]["steps"]
    evals = [r for r in read_metrics(run / METRICS_FILE) if "eval_top1" in r and r["step"] == steps]
    if not evals:
        raise SystemExit(f"study: {run} has no evaluation at its last step {steps}; remove the folder and run again")
    return {"steps": steps, "split": evals[-1]["eval_split"], "top1": evals[-1]["eval_top1"],
            "top5": evals[-1]["eval_top5"]}


def continue_or_clear(run: Path) -> bool:
    """True if ``run`` holds a stopped training to resume; a folder stopped before its first
    checkpoint is removed (nothing in it can be continued)."""
    if (run / STATE_FILE).is_file():
        return True
    if run.exists():
        print(f"removing {run}: stopped before its first checkpoint", flush=True)
        shutil.rmtree(run)
    return False


def void_transfer(folder: Path) -> None:
    """Remove what was measured on an earlier model in ``folder``: its model is being made again."""
    shutil.rmtree(folder / "finetune", ignore_errors=True)
    for name in ("result_fewshot.json", "result_finetune.json"):
        (folder / name).unlink(missing_ok=True)


def write_result(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    return result


# ---------------------------------------------------------------- the three steps of one model

def pretrain(fam: Family, size: int, args: argparse.Namespace, run: Runner) -> dict[str, Any]:
    """Pre-train ``fam`` on ``size`` images of classes 0-4; its own test top-1."""
    folder = args.out / f"{fam.name}-{size}"
    marker, train_dir = folder / "result_pretrain.json", folder / "pretrain"
    command = ["train", *fam.options(), "--data", args.data, "--classes", *PRETRAIN_CLASSES,
               "--train-subset", size, "--epochs", f"{args.epochs:g}", "--batch-size", args.batch_size,
               "--optimizer", "adamw", "--lr", "0.001", "--weight-decay", "0.05", "--warmup-fraction", "0.05",
               "--schedule", "cosine", "--clip-grad-norm", "1.0", "--label-smoothing", "0.1", "--crop", "pad",
               "--hflip", "--precision", args.precision, "--seed", "0", "--eval-every", "1000000",
               "--checkpoint-every", args.checkpoint_every, "--threads", args.threads, "--out", train_dir]
    command = [str(a) for a in command]
    if marker.is_file():
        print(f"done before: {fam.name} pre-trained on {size:,} images ({marker})", flush=True)
        return json.loads(marker.read_text())
    tick = time.perf_counter()
    if not args.dry_run:
        void_transfer(folder)
    if not args.dry_run and continue_or_clear(train_dir):
        run(["train", "--resume", train_dir, "--threads", args.threads, "--data", args.data])
    else:
        run(command)
    if args.dry_run:
        return {}
    e = final_eval(train_dir)
    return write_result(marker, {"command": "vitlab " + shlex.join(command), "steps": e["steps"],
                                 "test_top1": e["top1"], "test_top5": e["top5"], "model": str(train_dir),
                                 "wall_s": round(time.perf_counter() - tick, 1)})


def random_init(fam: Family, args: argparse.Namespace) -> dict[str, Any]:
    """The "0 images" reference: the family's model as every run initialises it (seed 0)."""
    folder = args.out / f"{fam.name}-0"
    path, marker = folder / "random_init.safetensors", folder / "result_pretrain.json"
    overrides = ", ".join(f"{k}={v!r}" for k, v in fam.overrides.items())
    command = (f"python -c \"import torch, vitlab; torch.manual_seed(0); vitlab.save_model(vitlab.create_model("
               f"'{fam.model}', num_classes=5, {overrides}), '{path}')\"")
    if marker.is_file():
        print(f"done before: {fam.name} at random initialisation ({marker})", flush=True)
        return json.loads(marker.read_text())
    print(f"\n$ {command}", flush=True)
    if args.dry_run:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    void_transfer(folder)
    torch.manual_seed(0)
    vitlab.save_model(fam.build(len(PRETRAIN_CLASSES)), path)
    return write_result(marker, {"command": command, "steps": 0, "model": str(path)})


def fewshot(fam: Family, size: int, model: str, args: argparse.Namespace, run: Runner) -> dict[str, Any]:
    """Few-shot linear evaluation of the frozen features on classes 5-9."""
    marker = args.out / f"{fam.name}-{size}" / "result_fewshot.json"
    command = ["fewshot", "--from", model, "--data", args.data, "--classes", *TRANSFER_CLASSES, "--shots", args.shots,
               "--seeds", args.seeds, "--cache-dir", args.out / "features", "--json"]
    command = [str(a) for a in command]
    if marker.is_file():
        print(f"done before: {fam.name}-{size} few-shot ({marker})", flush=True)
        return json.loads(marker.read_text())
    report = run(command, capture=True)
    if args.dry_run:
        return {}
    report = json.loads(report)
    return write_result(marker, {"command": "vitlab " + shlex.join(command),
                                 "ridge": {str(r["shots"]): {"mean": r["mean"], "std": r["std"]}
                                           for r in report["ridge"]},
                                 "num_test": report["num_test"], "seeds": report["seeds"]})


def finetune(fam: Family, size: int, model: str, args: argparse.Namespace, run: Runner) -> dict[str, Any]:
    """Fine-tune on ``finetune_images`` images of classes 5-9; their test top-1."""
    folder = args.out / f"{fam.name}-{size}"
    marker, out = folder / "result_finetune.json", folder / "finetune"
    command = ["finetune", "--from", model, "--data", args.data, "--classes", *TRANSFER_CLASSES,
               "--train-subset", args.finetune_images, "--lr", f"{args.finetune_lr:g}", "--steps", args.finetune_steps,
               "--batch-size", args.batch_size, "--accum-steps", "1", "--warmup-steps", args.finetune_warmup,
               "--crop", "pad", "--hflip", "--precision", args.precision, "--eval-every", args.finetune_steps,
               "--checkpoint-every", max(1, args.finetune_steps // 4), "--threads", args.threads, "--out", out]
    command = [str(a) for a in command]
    if marker.is_file():
        print(f"done before: {fam.name}-{size} fine-tuning ({marker})", flush=True)
        return json.loads(marker.read_text())
    tick = time.perf_counter()
    if not args.dry_run and continue_or_clear(out / "final"):
        run(["train", "--resume", out / "final", "--threads", args.threads, "--data", args.data])
    else:
        if out.exists() and not args.dry_run:
            shutil.rmtree(out)  # a sweep or summary without a final run to continue: start again
        run(command)
    if args.dry_run:
        return {}
    e = final_eval(out / "final")
    return write_result(marker, {"command": "vitlab " + shlex.join(command), "test_top1": e["top1"],
                                 "test_top5": e["top5"], "steps": e["steps"],
                                 "wall_s": round(time.perf_counter() - tick, 1)})


# ---------------------------------------------------------------- results: JSON, PNG, markdown

def collect(args: argparse.Namespace, families: dict[str, Family]) -> list[dict[str, Any]]:
    """One row per (family, size) from the finished runs' result files."""
    rows = []
    for size in [0, *args.sizes] if args.baseline else args.sizes:
        for fam in families.values():
            folder = args.out / f"{fam.name}-{size}"
            parts = {name: json.loads(p.read_text()) for name in ("pretrain", "fewshot", "finetune")
                     if (p := folder / f"result_{name}.json").is_file()}
            if not parts:
                continue
            with torch.device("meta"):
                model = fam.build(len(PRETRAIN_CLASSES))
            gflops = vitlab.count_flops(model) / 1e9
            steps = parts.get("pretrain", {}).get("steps", 0)
            rows.append({"family": fam.name, "size": size, "model": fam.model, "overrides": fam.overrides,
                         "params": sum(p.numel() for p in model.parameters()), "gflops": gflops,
                         "steps": steps, "pretrain_flops": 3 * gflops * 1e9 * steps * args.batch_size,
                         **parts})
    return rows


def metric(row: dict[str, Any], key: str) -> float | None:
    """A row's value of ``key`` (``own``, ``finetune``, ``k<shots>``) in percent, None if not measured."""
    if key == "own":
        v = row.get("pretrain", {}).get("test_top1")
    elif key == "finetune":
        v = row.get("finetune", {}).get("test_top1")
    else:
        v = row.get("fewshot", {}).get("ridge", {}).get(key[1:], {}).get("mean")
    return None if v is None else 100 * v


def panels(shots: list[int], finetune_images: int) -> list[tuple[str, str]]:
    """(measure, title) of each panel of the PNG and line of the crossover list."""
    return [("own", "own test top-1, classes 0-4"),
            ("finetune", f"fine-tuned on {finetune_images:,} images of classes 5-9")] + \
        [(f"k{k}", f"{k}-shot linear, classes 5-9") for k in shots]


def plot(rows: list[dict[str, Any]], shots: list[int], path: Path, finetune_images: int) -> Path:
    """Accuracy against pre-training images (log x), one panel per measure; random init dashed."""
    style = {"ViT": ("tab:blue", "o"), "BiT": ("tab:red", "s")}
    boxes = panels(shots, finetune_images)
    sizes = sorted({r["size"] for r in rows if r["size"] > 0})
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(boxes) / cols), cols, figsize=(13, 3.6 * math.ceil(len(boxes) / cols)),
                             dpi=110, squeeze=False)
    for ax, (key, title) in zip(axes.flat, boxes):
        for name, (colour, marker) in style.items():
            points = sorted((r["size"], metric(r, key)) for r in rows if r["family"] == name and r["size"] > 0
                            and metric(r, key) is not None)
            if points:
                ax.plot(*zip(*points), marker=marker, color=colour, label=name)
            base = next((metric(r, key) for r in rows if r["family"] == name and r["size"] == 0), None)
            if base is not None:
                ax.axhline(base, color=colour, ls="--", lw=1, alpha=0.7, label=f"{name} random init")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
        ax.minorticks_off()
        ax.set(title=title, xlabel="pre-training images (classes 0-4)", ylabel="test top-1 (%)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(boxes):]:
        ax.axis("off")
    fig.suptitle("CIFAR-10: ViT against BiT ResNet by pre-training set size (same epochs, similar FLOPs per image)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def crossover(rows: list[dict[str, Any]], key: str) -> str:
    """Where ViT minus BiT changes sign along the pre-training sizes, in words."""
    vit = {r["size"]: metric(r, key) for r in rows if r["family"] == "ViT" and r["size"] > 0}
    bit = {r["size"]: metric(r, key) for r in rows if r["family"] == "BiT" and r["size"] > 0}
    sizes = sorted(s for s in vit if s in bit and vit[s] is not None and bit[s] is not None)
    if not sizes:
        return "not measured yet"
    gaps = [vit[s] - bit[s] for s in sizes]
    spread = ", ".join(f"{s:,}: {g:+.1f}" for s, g in zip(sizes, gaps))
    ahead = [(s, g) for s, g in zip(sizes, gaps) if g != 0]  # a tie is no side
    if not ahead:
        return f"level at every size (ViT - BiT points, by size: {spread})"
    changes = [(a, b, "ViT" if gb > 0 else "BiT") for (a, ga), (b, gb) in zip(ahead, ahead[1:]) if (ga > 0) != (gb > 0)]
    if not changes:
        lead = "ViT" if ahead[0][1] > 0 else "BiT"
        return f"no crossover: {lead} ahead at every size (ViT - BiT points, by size: {spread})"
    said = "; ".join(f"{who} overtakes between {a:,} and {b:,} images" for a, b, who in changes)
    return f"{said} (ViT - BiT points, by size: {spread})"


def section(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace, png: Path,
            results: Path, planned: int, families: dict[str, Family]) -> str:
    """The markdown between the datasize markers: setting, table, crossovers, PNG, commands."""
    shots = [int(s) for s in args.shots.split(",")]
    fams = "; ".join(f"**{f.name}** `{f.model}` {f.overrides}: {f.description}" for f in families.values())
    lines = [START, "## Results (`benchmarks/datasize/study.py`)", "",
             f"- command: `{info['command']}`",
             f"- models: {fams}",
             f"- pre-training: classes 0-4, train subsets {', '.join(f'{s:,}' for s in args.sizes)}, "
             f"{args.epochs:g} epochs of batch {args.batch_size} for every size; transfer: classes 5-9, "
             f"{args.shots.replace(',', '/')}-shot ridge (mean ± std over {args.seeds} draws) on their test images, "
             f"fine-tuning ({args.finetune_steps} steps of {args.batch_size}, SGD lr {args.finetune_lr:g}) on "
             f"{args.finetune_images:,} of their training images",
             f"- machine: {info['machine']} (`uptime` before: `{info['uptime_before']}`; after: "
             f"`{info.get('uptime_after', 'n/a (not finished)')}`)",
             f"- versions: Python {info['python']}, torch {info['torch']}, vitlab {info['vitlab']}; "
             f"date {info['date']}; wall time of this invocation {info.get('wall_s', 0) / 60:.0f} min", ""]
    done = sum(1 for r in rows if {"pretrain", "fewshot", "finetune"} <= set(r))
    if done < planned:
        lines += [f"**Partial: {done} of {planned} models measured.**", ""]
    heads = ["pre-training images", "family", "steps", "pre-training PFLOPs", "own top-1 (0-4)",
             *[f"{k}-shot (5-9)" for k in shots], "fine-tuned (5-9)"]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---:|" * len(heads)]
    def cell(row: dict[str, Any], key: str) -> str:
        v = metric(row, key)
        if v is None:
            return "-"
        return f"{v:.1f} ± {100 * row['fewshot']['ridge'][key[1:]]['std']:.1f}" if key.startswith("k") else f"{v:.1f}"

    keys = ["own", *[f"k{k}" for k in shots], "finetune"]
    for r in sorted(rows, key=lambda r: (r["size"], r["family"])):
        size = f"{r['size']:,}" if r["size"] else "0 (random init)"
        lines.append(f"| {size} | {r['family']} | {r['steps']:,} | {r['pretrain_flops'] / 1e15:.2f} | "
                     + " | ".join(cell(r, k) for k in keys) + " |")
    lines += ["", "Crossover (ViT - BiT, percentage points):", ""]
    lines += [f"- {title}: {crossover(rows, key)}" for key, title in panels(shots, args.finetune_images)]
    rel = os.path.relpath(png, results.parent)
    lines += ["", f"![accuracy against pre-training set size]({rel})", "", END]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    except OSError:
        out = ""
    return f"{vitlab.__version__} (git {out.strip() or 'unknown'})"


# ---------------------------------------------------------------- main

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data", default="../shared/data/cifar-10-batches-bin", help="CIFAR-10 folder")
    p.add_argument("--out", type=Path, default=Path("runs/datasize"), help="one folder per run, and the feature cache")
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--sizes", nargs="+", type=int, help=f"pre-training subset sizes (default {FULL['sizes']})")
    p.add_argument("--epochs", type=float, help=f"pre-training epochs, every size (default {FULL['epochs']:g})")
    p.add_argument("--batch-size", type=int, help=f"pre-training and fine-tuning batch (default {FULL['batch_size']})")
    p.add_argument("--shots", help=f"few-shot k (default {FULL['shots']})")
    p.add_argument("--seeds", type=int, help=f"few-shot draws per k (default {FULL['seeds']})")
    p.add_argument("--finetune-images", type=int, help=f"labelled images of classes 5-9 (default "
                                                       f"{FULL['finetune_images']})")
    p.add_argument("--finetune-steps", type=int, help=f"default {FULL['finetune_steps']}")
    p.add_argument("--finetune-warmup", type=int, help=f"warm-up steps (default {FULL['finetune_warmup']})")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="SGD lr, one for every model (default 0.01)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help=f"default {FULL['precision']}")
    p.add_argument("--checkpoint-every", type=int, help=f"pre-training steps (default {FULL['checkpoint_every']})")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="leave out the random-initialisation reference")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes (the test; synthetic data)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--json", type=Path, default=HERE / "results.json")
    p.add_argument("--plot", type=Path, default=HERE / "datasize.png")
    p.add_argument("--results", type=Path, default=HERE / "README.md",
                   help="the markdown file whose datasize section to rewrite")
    args = p.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sizes = sorted(set(args.sizes))
    shots = [int(s) for s in args.shots.split(",")]
    if min(args.sizes) < 1 or min(shots) < 1 or any(s % len(PRETRAIN_CLASSES) for s in args.sizes):
        p.error(f"--sizes must be positive multiples of {len(PRETRAIN_CLASSES)} and --shots positive, got "
                f"{args.sizes} and {args.shots}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    families = {k: v for k, v in (TINY_FAMILIES if args.tiny else FAMILIES).items() if k in args.families}
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Runner(args.dry_run)
    start = time.perf_counter()
    given = sys.argv[1:] if argv is None else argv
    info = {"command": shlex.join(["python", "benchmarks/datasize/study.py", *given]),
            "machine": machine(), "uptime_before": uptime(), "python": platform.python_version(),
            "torch": torch.__version__, "vitlab": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    planned = len(families) * (len(args.sizes) + args.baseline)

    def report() -> None:
        if args.dry_run:
            return
        info["wall_s"] = time.perf_counter() - start
        rows = collect(args, families)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "settings": {k: str(v) if isinstance(v, Path) else v
                                                                    for k, v in vars(args).items()},
                                         "rows": rows}, indent=1) + "\n")
        png = plot(rows, [int(s) for s in args.shots.split(",")], args.plot, args.finetune_images)
        write_section(args.results, section(rows, info, args, png, args.results, planned, families), START, END)

    print(f"uptime before: {info['uptime_before']}", flush=True)
    for size in [0, *args.sizes] if args.baseline else args.sizes:
        for fam in families.values():
            if size == 0:
                model = random_init(fam, args).get("model", str(args.out / f"{fam.name}-0" / "random_init.safetensors"))
            else:
                model = pretrain(fam, size, args, run).get("model", str(args.out / f"{fam.name}-{size}" / "pretrain"))
            fewshot(fam, size, model, args, run)
            finetune(fam, size, model, args, run)
            report()
    info["uptime_after"] = uptime()
    report()
    if not args.dry_run:
        print(f"\nwrote {args.json}, {args.plot} and the datasize section of {args.results} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
