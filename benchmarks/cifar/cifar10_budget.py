"""CIFAR-10 test accuracy against wall time: `vitlab train --recipe cifar10 --time-budget Xm` per budget.

Each point is one `vitlab train` process, timed end to end from outside (interpreter start,
data decoding, schedule sizing, training, the final evaluation and checkpoint). No validation
split: the run trains on all 50,000 training images and evaluates its last weights once, at the
end, on the official 10,000-image test set (`--eval-every 1000000` turns off mid-run
evaluation; the loop always evaluates after its last step). The test set is never used to make
a choice: the recipes were tuned on `--val-split 0.1` (benchmarks/cifar/notes.md).

Results accumulate in benchmarks/cifar/cifar10_budget.json (keyed by recipe, its version, budget and seed), so
budgets can be run in separate sessions; each point records a hash of what its recipe sets, and
the table and plot show the points of the recipes as they are now beside those of each recipe's
last earlier version (older ones are listed); each run rewrites the `cifar10_budget` section of
benchmarks/cifar/README.md (table of every stored point, mean and std over seeds) and
benchmarks/cifar/cifar10_budget.png.

    python benchmarks/cifar/cifar10_budget.py                       # 10, 30, 60, 120 min, seed 0, + baseline at 30
    python benchmarks/cifar/cifar10_budget.py --budgets 30 --seeds 0 1 2 --no-baseline
    python benchmarks/cifar/cifar10_budget.py --budgets 10 --baseline-budgets 10
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from vitlab.checkpoint import write_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS, STORE, PNG = HERE / "README.md", HERE / "cifar10_budget.json", HERE / "cifar10_budget.png"
DATA_GUESSES = [base / "shared" / "data" / "cifar-10-batches-bin" for base in (ROOT.parent, ROOT.parent.parent)]
START, END = "<!-- cifar10_budget:start -->", "<!-- cifar10_budget:end -->"


def machine() -> dict[str, str]:
    """CPU model, core count and library versions, for the record."""
    import torch

    model = platform.processor() or "unknown"
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), model)
    except (OSError, subprocess.CalledProcessError):
        pass
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return {"cpu": model, "cores": str(os.cpu_count()), "torch": torch.__version__, "python": platform.python_version(),
            "git": git.strip() or "unknown"}


def recipe_version(name: str) -> str:
    """A short hash of what the recipe sets (its config's differences from TrainConfig's defaults):
    points of an older version of a recipe are not mixed in; a new config field with a default is
    not a new version."""
    sys.path.insert(0, str(ROOT / "src"))
    from vitlab.config import to_dict
    from vitlab.recipes import RECIPES
    from vitlab.trainconfig import TrainConfig

    def changes(cfg: dict, default: dict) -> dict:
        return {k: changes(v, default[k]) if isinstance(v, dict) and isinstance(default.get(k), dict) and v
                else v for k, v in cfg.items() if v != default.get(k)}

    text = json.dumps(changes(to_dict(RECIPES[name].config), to_dict(TrainConfig())), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def current(points: list[dict]) -> list[dict]:
    """The points measured with the recipes as they are now."""
    return [p for p in points if p.get("recipe_version") == recipe_version(p["recipe"])]


def previous(points: list[dict]) -> list[dict]:
    """The points of each recipe's last earlier version (the one most recently measured before it changed)."""
    old = [p for p in points if p not in current(points)]
    last = {p["recipe"]: p["recipe_version"] for p in sorted(old, key=lambda p: p["date"])}
    return [p for p in old if last[p["recipe"]] == p["recipe_version"]]


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every ``every`` seconds while a run goes on."""

    def __init__(self, every: float = 15.0) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self.done = every, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        s = self.samples or [os.getloadavg()[0]]
        return {"load_mean": round(statistics.mean(s), 2), "load_max": round(max(s), 2)}


def run_point(recipe: str, minutes: float, seed: int, data: str, runs: Path, extra: list[str]) -> dict:
    """One `vitlab train` run, timed end to end; its final test accuracy and how it was sized."""
    out = runs / f"{recipe}-{minutes:g}m-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = ["vitlab", "train", "--recipe", recipe, "--data", data, "--time-budget", f"{minutes:g}m",
           "--seed", str(seed), "--eval-every", "1000000", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print("$ " + " ".join(cmd), flush=True)
    where = machine()  # before the run: the git commit is the code it ran
    sampler = LoadSampler()
    sampler.start()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vitlab", *cmd[1:]], env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    load = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    final = [r for r in records if "eval_top1" in r][-1]
    config = json.loads((out / "config.json").read_text())
    last = max(r["step"] for r in records if "loss" in r)  # a budget run re-plans its steps as it goes
    if final["eval_split"] != "test" or final["step"] != last:
        raise RuntimeError(f"{out}: the last evaluation is not on the test set after the last step: {final}")
    return {"recipe": recipe, "recipe_version": recipe_version(recipe), "budget_min": minutes, "seed": seed,
            "command": " ".join(cmd),
            "wall_s": round(wall, 1), "test_top1": final["eval_top1"], "test_top5": final["eval_top5"],
            "steps": final["step"], "epochs": round(final["step"] / config["steps_per_epoch"], 2),
            "precision": config["train"]["precision"],
            "step_s_sized": round(config["sized_by"]["step_s"], 3), "steps_first_plan": config["train"]["steps"],
            "run_dir": str(out),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **load, **where}


def load_store() -> list[dict]:
    return json.loads(STORE.read_text()) if STORE.exists() else []


def save_store(points: list[dict]) -> None:
    STORE.write_text(json.dumps(points, indent=1) + "\n")


def plot(points: list[dict], path: Path, earlier: list[dict] = ()) -> None:
    """Test top-1 against wall time: one line per recipe, mean and std over seeds (``earlier``: dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines = [(recipe, marker, pts, label, style) for pts, label, style in ((points, "{}", "-"),
                                                                           (earlier, "{} (earlier recipe)", "--"))
             for recipe, marker in (("cifar10", "o"), ("cifar10_baseline", "s"))]
    for recipe, marker, pts, label, style in lines:
        rows = sorted(group(pts, recipe).items())
        if not rows:
            continue
        xs = [statistics.mean(p["wall_s"] for p in ps) / 60 for _, ps in rows]
        ys = [100 * statistics.mean(p["test_top1"] for p in ps) for _, ps in rows]
        es = [100 * statistics.stdev(p["test_top1"] for p in ps) if len(ps) > 1 else 0.0 for _, ps in rows]
        ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, linestyle=style, label=label.format(recipe),
                    alpha=1.0 if style == "-" else 0.5)
    for target, minutes in ((80, 30), (85, 60), (90, 120)):
        ax.plot([minutes], [target], marker="*", color="grey", linestyle="none")
    ax.plot([], [], marker="*", color="grey", linestyle="none", label="issue 8 targets")
    ax.set_xlabel("wall time, end to end (minutes)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.set_title("ViT from scratch on 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def group(points: list[dict], recipe: str) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for p in points:
        if p["recipe"] == recipe:
            out.setdefault(p["budget_min"], []).append(p)
    return out


def section(stored: list[dict]) -> str:
    """The `cifar10_budget` section of README.md: the current recipes' points, then every command."""
    points = current(stored)
    lines = [START, "## CIFAR-10 from scratch: test accuracy against wall time (issue 8)", "",
             "Made by `python benchmarks/cifar/cifar10_budget.py` (raw points: `benchmarks/cifar/cifar10_budget.json`). "
             "Wall time is one `vitlab train` process end to end; the test top-1 is of the last weights. "
             "The load average during each run is shown: 2.0 is this 2-core machine fully busy with the run "
             "alone; more means other jobs shared the cores and the budget bought fewer steps.", "",
             "| recipe | budget | seeds | test top-1 (mean ± std) | wall time | steps (epochs) | precision | load avg mean/max |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(recipe, pts, label) for pts, label in ((points, "`{}`"), (previous(stored), "`{}`, *earlier recipe*"))
            for recipe in ("cifar10", "cifar10_baseline")]
    for recipe, pts, label in rows:
        for minutes, ps in sorted(group(pts, recipe).items()):
            accs = [100 * p["test_top1"] for p in ps]
            std = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            lines.append(
                f"| {label.format(recipe)} | {minutes:g} min | {', '.join(str(p['seed']) for p in ps)} | "
                f"{statistics.mean(accs):.2f}%{std} | {statistics.mean(p['wall_s'] for p in ps) / 60:.1f} min | "
                f"{round(statistics.mean(p['steps'] for p in ps))} ({statistics.mean(p['epochs'] for p in ps):.2f}) | "
                f"{', '.join(sorted({p.get('precision', '?') for p in ps}))} | "
                f"{statistics.mean(p['load_mean'] for p in ps):.1f} / {max(p['load_max'] for p in ps):.1f} |")
    lines += ["", f"![test accuracy against wall time]({PNG.name})", ""]
    todo = missing(points)
    if todo:
        lines += ["Not measured yet (issue 8's protocol); on a quiet machine, run:", ""]
        lines += [f"    python benchmarks/cifar/cifar10_budget.py {args}" for args in todo] + [""]
    lines += ["Commands, machines and versions (points marked *earlier recipe* ran an older version of the "
              "recipe; the table and plot (dashed) show the last earlier version beside the current one; "
              "`benchmarks/cifar/notes.md` says what changed):", ""]
    for p in stored:
        old = "" if p in points else "*earlier recipe* "
        lines.append(f"- {old}{p['date']}, {p['cpu']} ({p['cores']} cores), torch {p['torch']}, python {p['python']}, "
                     f"git {p['git']}: `{p['command']}` -> {100 * p['test_top1']:.2f}% in {p['wall_s'] / 60:.1f} min")
    lines.append(END)
    return "\n".join(lines)


def missing(points: list[dict]) -> list[str]:
    """Arguments of this script that complete issue 8's protocol: 10/30/60/120 min, 3 seeds at 30, baseline at 30."""
    have = {(p["recipe"], p["budget_min"], p["seed"]) for p in points}
    budgets = [m for m in (10, 30, 60, 120) if ("cifar10", m, 0) not in have]
    seeds = [s for s in (0, 1, 2) if ("cifar10", 30, s) not in have and not (s == 0 and 30 in budgets)]
    todo = [f"--budgets {' '.join(map(str, budgets))} --no-baseline"] if budgets else []
    todo += [f"--budgets 30 --seeds {' '.join(map(str, seeds))} --no-baseline"] if seeds else []
    todo += ["--budgets --baseline-budgets 30"] if ("cifar10_baseline", 30, 0) not in have else []
    return todo


def write_results(points: list[dict]) -> None:
    write_section(RESULTS, section(points), START, END, title="# Benchmark results\n")
    plot(current(points), PNG, previous(points))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="*", default=[10, 30, 60, 120], help="minutes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--baseline-budgets", type=float, nargs="*", default=[30],
                   help="budgets (minutes) for the cifar10_baseline recipe, seed of --seeds[0]")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--data", default=next((str(d) for d in DATA_GUESSES if d.is_dir()), "cifar10"),
                   help="a CIFAR-10 folder (default: ../shared/data/cifar-10-batches-bin from the checkout or "
                        "its parent; else cifar10, which downloads)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "cifar10_budget")
    p.add_argument("--report-only", action="store_true", help="rewrite README.md and the PNG from the stored points")
    p.add_argument("extra", nargs="*", help="after --: more `vitlab train` options for every run")
    args = p.parse_args(argv)
    points = load_store()
    if not args.report_only:
        plan = [("cifar10", m, s) for m in args.budgets for s in args.seeds]
        if not args.no_baseline:
            plan += [("cifar10_baseline", m, args.seeds[0]) for m in args.baseline_budgets]
        for recipe, minutes, seed in plan:
            point = run_point(recipe, minutes, seed, args.data, args.runs, args.extra)
            print(f"{recipe} {minutes:g} min seed {seed}: test top-1 {100 * point['test_top1']:.2f}% "
                  f"in {point['wall_s'] / 60:.1f} min (load {point['load_mean']})", flush=True)
            key = (recipe, point["recipe_version"], minutes, seed)  # a point of an earlier version is kept
            points = [q for q in points if (q["recipe"], q["recipe_version"], q["budget_min"], q["seed"]) != key]
            points.append(point)
            save_store(points)
            write_results(points)  # after every point: a stopped session keeps what it measured
    write_results(points)
    print(f"wrote {RESULTS} and {PNG}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
