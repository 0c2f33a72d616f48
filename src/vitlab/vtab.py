"""VTAB-1k (Zhai et al. 2019) as in the paper (App. B.1.1): fine-tune on each task's 1,000 images, then test.

``--tasks DIR`` holds one image folder per task, named as in ``vtab_tasks.json`` (which gives its group:
natural, specialized or structured; any other name goes to "other")::

    TASK/train/<class>/<image>      the 1,000 training images; 800 + 200 are drawn from them (seeded) ...
    TASK/train800/, TASK/val200/    ... or VTAB's own split, given as two folders (train: both)
    TASK/test/<class>/<image>       the test split
    TASK/classes.txt                optional: every class, in label order (a split may lack some)

Per task, each lr of the sweep trains on the 800 images and is scored on the 200 (``transfer.finetune``
with ``sweep_data``); the best trains on all 1,000 and is tested. The setting is the ``vtab`` recipe.
``OUT/TASK/result.json`` (written atomically) marks a finished task: the same command with the same
``--out`` skips finished tasks and starts an unfinished one over. ``OUT/vtab.json`` and ``OUT/vtab.png``
hold per-task top-1, the group means and the mean over tasks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .checkpoint import write_json
from .data.datasets import CLASS_LIST, read_class_list, scan_class_folders
from .errors import Interrupted
from .plots import plot_vtab
from .recipes import recipe
from .run import LOCK_FILE, RunLock, is_temporary
from .transfer import LR_SWEEP, SUMMARY_FILE, finetune, finetune_config
from .trainconfig import RESUME_FIELDS

TASKS_FILE = Path(__file__).with_name("vtab_tasks.json")
GROUPS = ("natural", "specialized", "structured", "other")
VAL_SHARE = 0.2  # VTAB-1k: 200 of the 1,000 training images choose the hyper-parameters
SPLIT_SEED = 0  # the 800 / 200 draw from a plain TASK/train
CONFIG_FILE, RESULT_FILE, PLOT_FILE = "vtab_config.json", "vtab.json", "vtab.png"
TASK_RESULT_FILE = "result.json"  # OUT/TASK/result.json: a finished task


@dataclass(frozen=True)
class TaskSpec:
    """One of VTAB-1k's tasks, as ``vtab_tasks.json`` describes it."""

    name: str
    group: str
    label: str
    task_adaptation: str
    crop: bool
    flip: bool
    aliases: tuple[str, ...] = ()


def task_specs() -> dict[str, TaskSpec]:
    """The 19 tasks by folder name (aliases included), from ``vtab_tasks.json``."""
    tasks = json.loads(TASKS_FILE.read_text())["tasks"]
    specs = {name: TaskSpec(name, **{**t, "aliases": tuple(t["aliases"])}) for name, t in tasks.items()}
    return {**{a: s for s in specs.values() for a in s.aliases}, **specs}


def _key(name: str) -> str:
    return name.lower().replace("-", "_").replace(" ", "_")


@dataclass
class Task:
    """A task folder, checked: its 800 / 200 training images by class, its test folder and classes."""

    name: str
    root: Path
    spec: TaskSpec | None  # None: not one of VTAB-1k's tasks
    train: dict[str, list[str]]  # class -> image paths (the 800)
    val: dict[str, list[str]]  # class -> image paths (the 200)
    test: Path
    classes: list[str]
    num_test: int

    @property
    def group(self) -> str:
        return self.spec.group if self.spec else "other"

    @property
    def label(self) -> str:
        return self.spec.label if self.spec else self.name


def _count(files: dict[str, list[str]]) -> int:
    return sum(map(len, files.values()))


def read_task(root: Path, specs: dict[str, TaskSpec]) -> Task:
    """The task in ``root``: its splits scanned and checked, 800 / 200 drawn from a plain ``train/``."""
    if not (root / "test").is_dir():
        raise ValueError(f"task {root} has no test split: expected {root}/test/<class>/<image> beside its "
                         f"training images")
    if (root / "train800").is_dir() or (root / "val200").is_dir():
        if not ((root / "train800").is_dir() and (root / "val200").is_dir()):
            raise ValueError(f"task {root} has only one of train800/ and val200/: give both, or all 1,000 "
                             f"images as {root}/train/<class>/<image>")
        train, val = scan_class_folders(root / "train800").files, scan_class_folders(root / "val200").files
    elif (root / "train").is_dir():
        files = scan_class_folders(root / "train").files
        pairs = [(c, p) for c, paths in files.items() for p in paths]  # by class, then path: a fixed order
        if len(pairs) < 2:
            raise ValueError(f"task {root} has {len(pairs)} training image; it needs at least 2 (VTAB-1k: 1,000)")
        held = set(random.Random(SPLIT_SEED).sample(range(len(pairs)), max(1, round(VAL_SHARE * len(pairs)))))
        train, val = {}, {}
        for i, (c, p) in enumerate(pairs):
            (val if i in held else train).setdefault(c, []).append(p)
    else:
        raise ValueError(f"task {root} has no training images: expected {root}/train/<class>/<image> (1,000 "
                         f"images) or {root}/train800/ and {root}/val200/")
    test = scan_class_folders(root / "test").files
    found = sorted(set(train) | set(val) | set(test))
    classes = read_class_list(root) or found
    unlisted = [c for c in found if c not in classes]
    if unlisted:
        raise ValueError(f"{root / CLASS_LIST} does not list the class folder(s) {unlisted[:5]}; add them")
    return Task(root.name, root, specs.get(_key(root.name)), train, val, root / "test", classes, _count(test))


def find_tasks(tasks_dir: str | os.PathLike, only: list[str] | None = None, *,
               log: Callable[[str], None] = tqdm.write) -> list[Task]:
    """Every task folder of ``tasks_dir`` (or the ``only`` ones), checked before anything trains."""
    root = Path(tasks_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"tasks folder {tasks_dir} does not exist or is not a folder; pass --tasks DIR "
                                f"holding one folder per task (TASK/train/<class>/<image>, TASK/test/...)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if only:
        missing = [n for n in only if n not in names]
        if missing:
            raise ValueError(f"--only names task(s) {missing} that {root} does not hold (it holds {', '.join(names)})")
        names = [n for n in names if n in only]
    if not names:
        raise ValueError(f"{root} holds no task folders; expected {root}/TASK/train/<class>/<image> and "
                         f"{root}/TASK/test/<class>/<image> per task")
    specs = task_specs()
    tasks = [read_task(root.resolve() / n, specs) for n in names]
    seen: dict[str, str] = {}
    for t in tasks:
        if t.spec and t.spec.name in seen:
            raise ValueError(f"{root} holds {seen[t.spec.name]} and {t.name}, both VTAB's {t.spec.name}; keep one")
        if t.spec:
            seen[t.spec.name] = t.name
        else:
            log(f"warning: {t.name} is not one of VTAB-1k's 19 tasks ({TASKS_FILE.name}); it goes to the 'other' "
                f"group and into the overall mean")
        n = _count(t.train) + _count(t.val)
        if n != 1000:
            log(f"note: {t.name} has {n} training images; VTAB-1k has 1,000 (800 + 200)")
    return tasks


def _link_view(view: Path, splits: dict[str, list[tuple[Path, dict[str, list[str]]]]], classes: list[str]) -> Path:
    """An image folder of symbolic links at ``view``: ``split -> [(source folder, its class -> files)]``."""
    view.mkdir(parents=True)
    (view / CLASS_LIST).write_text("".join(c + "\n" for c in classes))
    for split, sources in splits.items():
        for source, files in sources:
            for c, paths in files.items():
                for p in paths:  # view/split/class/<source>/<path in the class folder>: never two the same
                    link = view / split / c / source.name / os.path.relpath(p, source / c)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(os.path.abspath(p), link)
    return view


def make_views(task: Task, where: Path) -> tuple[Path, Path]:
    """Two image folders of links into the task: ``sweep`` (train: the 800, val: the 200) and ``all``
    (train: all 1,000, test: the task's test folder); both list every class in ``classes.txt``."""
    given = (task.root / "train800").is_dir()
    train = (task.root / ("train800" if given else "train"), task.train)
    val = (task.root / ("val200" if given else "train"), task.val)
    sweep = _link_view(where / "sweep", {"train": [train], "val": [val]}, task.classes)
    whole = _link_view(where / "all", {"train": [train, val]}, task.classes)
    os.symlink(task.test, whole / "test")
    return sweep, whole


def task_result(task: Task, work: Path) -> dict[str, Any]:
    """What ``OUT/TASK/result.json`` records of a finished task: its group, sizes, sweep and test top-1."""
    s = json.loads((work / SUMMARY_FILE).read_text())
    return {"task": task.name, "group": task.group, "label": task.label, "test_top1": s["test_top1"],
            "test_top5": s["test_top5"], "lr": s["lr"],
            "val200_top1": {f"{r['lr']:g}": r["minival_top1"] for r in s["sweep"]},
            "num_classes": len(task.classes), "num_train": _count(task.train) + _count(task.val),
            "num_val": _count(task.val), "num_test": task.num_test, "final_run": s["final_run"],
            "wall_s": s["wall_s"], "vtab_task": task.spec.name if task.spec else None}


@dataclass
class VtabResult:
    """The finished tasks (``OUT/*/result.json``), the tasks not run yet, the group means and the mean."""

    out: Path
    tasks: dict[str, dict[str, Any]]  # task folder -> its result
    pending: list[str]
    groups: dict[str, dict[str, Any]]  # group -> {"mean", "tasks"}
    mean: float | None  # over the finished tasks
    complete: bool  # all 19 VTAB-1k tasks finished
    json_path: Path
    png_path: Path | None

    def table(self) -> str:
        """The results as a text table: a row per task, then the group means and the mean."""
        rows = [f"{'task':<24}{'group':<13}{'test top-1':>11}{'lr':>8}{'classes':>9}{'test images':>13}"]
        for name, t in self.tasks.items():
            rows.append(f"{name:<24}{t['group']:<13}{100 * t['test_top1']:>10.2f}%{t['lr']:>8g}"
                        f"{t['num_classes']:>9}{t['num_test']:>13}")
        rows += [f"{name:<24}{'':<13}{'(not run)':>11}" for name in self.pending]
        for group, g in self.groups.items():
            count = f"{len(g['tasks'])} tasks"
            rows.append(f"{group + ' mean':<24}{count:<13}{100 * g['mean']:>10.2f}%")
        if self.mean is not None:
            note = "" if self.complete else "  (not all 19 tasks: no VTAB-1k score)"
            count = f"{len(self.tasks)} tasks"
            rows.append(f"{'mean':<24}{count:<13}{100 * self.mean:>10.2f}%{note}")
        return "\n".join(rows)


def summarize(out: Path, settings: dict[str, Any], pending: list[str]) -> VtabResult:
    """Every finished task's ``OUT/TASK/result.json`` into ``OUT/vtab.json`` and the bar chart ``OUT/vtab.png``."""
    found = [json.loads(f.read_text()) for f in sorted(out.glob(f"*/{TASK_RESULT_FILE}"))]
    finished = {r["task"]: r for r in sorted(found, key=lambda r: (GROUPS.index(r["group"]), r["task"]))}
    groups = {}
    for group in GROUPS:
        names = [n for n, r in finished.items() if r["group"] == group]
        if names:
            groups[group] = {"mean": sum(finished[n]["test_top1"] for n in names) / len(names), "tasks": names}
    mean = sum(r["test_top1"] for r in finished.values()) / len(finished) if finished else None
    complete = {s.name for s in task_specs().values()} <= {r["vtab_task"] for r in finished.values()}
    json_path = write_json(out / RESULT_FILE, {
        **settings, "tasks": finished, "pending": pending, "groups": groups, "mean": mean,
        "num_tasks": len(finished), "complete": complete})
    png = None
    if finished:
        means = {**{g: v["mean"] for g, v in groups.items()}, "mean": mean}
        png = plot_vtab([(r["label"], r["group"], r["test_top1"]) for r in finished.values()], means,
                        out / PLOT_FILE, title=f"VTAB-1k: {Path(settings['model']).name} ({len(finished)} tasks, mean "
                                               f"{100 * mean:.2f}%)")
    return VtabResult(out, finished, pending, groups, mean, complete, json_path, png)


def _check_out(out: Path, settings: dict[str, Any]) -> None:
    """A new or empty ``out``, or one this sweep's settings wrote (the options that only move a run may differ)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; pass a new folder name")
    recorded_file = out / CONFIG_FILE
    if recorded_file.is_file():
        recorded = json.loads(recorded_file.read_text())
        changed = [k for k in ("model", "tasks_dir", "lrs", "image_size") if recorded.get(k) != settings.get(k)]
        old, new = recorded.get("overrides", {}), settings["overrides"]
        changed += sorted(f"--{k.replace('_', '-')}" for k in set(old) | set(new)
                          if k not in RESUME_FIELDS and old.get(k) != new.get(k))
        if changed:
            raise ValueError(f"{out} holds a VTAB sweep with other settings ({', '.join(changed)} differ); repeat "
                             f"its options to continue it (see {recorded_file}), or pass another --out")
    elif out.is_dir() and any(p.name != LOCK_FILE and not is_temporary(p) for p in out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no VTAB sweep ({CONFIG_FILE}); pass a new or empty --out")


def vtab(model: str | os.PathLike, tasks_dir: str | os.PathLike, out: str | os.PathLike,
         lrs: list[float] | tuple[float, ...] = LR_SWEEP, *, image_size: int | None = None,
         only: list[str] | None = None, log: Callable[[str], None] = tqdm.write, **overrides: Any) -> VtabResult:
    """VTAB-1k of ``model`` (a released model's name, a run directory or a model file) on the tasks in
    ``tasks_dir`` (or the ``only`` ones), into ``out``; ``overrides`` as in ``vitlab.trainconfig.override``
    on the ``vtab`` recipe (``steps``, ``batch_size``, ``accum_steps``, ...). Finished tasks are kept."""
    out = Path(out)
    lrs = list(dict.fromkeys(lrs))
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"learning rates must be positive, got {lrs}")
    tasks = find_tasks(tasks_dir, only, log=log)
    if out.resolve().is_relative_to(Path(tasks_dir).expanduser().resolve()):
        raise ValueError(f"--out {out} is inside --tasks {tasks_dir}: it would read as a task; pass a folder elsewhere")
    ref = str(Path(model).resolve()) if Path(model).exists() else str(model)
    settings = json.loads(json.dumps({"model": ref, "tasks_dir": str(Path(tasks_dir).expanduser().resolve()),
                                      "lrs": lrs, "image_size": image_size, "overrides": overrides}))
    _check_out(out, settings)
    again = f"vitlab vtab --model {model} --tasks {tasks_dir} --out {out} (with the same options)"
    with RunLock(out, again=again):
        if not (out / CONFIG_FILE).is_file():
            write_json(out / CONFIG_FILE, settings)
        base = recipe("vtab")
        pending = [t.name for t in tasks if not (out / t.name / TASK_RESULT_FILE).is_file()]
        for i, task in enumerate(tasks, 1):
            work, step = out / task.name, f"[{i}/{len(tasks)}] {task.name}"
            if (work / TASK_RESULT_FILE).is_file():
                log(f"{step}: finished earlier ({work / TASK_RESULT_FILE}); skipped")
                continue
            if not (work / SUMMARY_FILE).is_file():  # (finished but for its result file: that is written below)
                if work.exists():
                    log(f"{step}: an unfinished attempt is in {work}; it starts over")
                    shutil.rmtree(work)
                log(f"{step} ({task.group}): {len(task.classes)} classes, {_count(task.train)} + "
                    f"{_count(task.val)} training images, {task.num_test} test images")
                sweep_data, all_data = make_views(task, work / "data")
                augment = {}
                if task.spec and "crop" not in overrides:
                    augment["crop"] = base.data.crop if task.spec.crop else "none"
                if task.spec and "hflip" not in overrides:
                    augment["hflip"] = task.spec.flip
                cfg = finetune_config(model, str(all_data), image_size=image_size, recipe_name="vtab", **augment,
                                      **overrides)
                once = {k: cfg.steps for k in ("eval_every", "checkpoint_every") if k not in overrides}
                cfg = dataclasses.replace(cfg, **once)  # one evaluation, at the end
                try:
                    finetune(cfg, work, lrs, sweep_data=str(sweep_data), log=log)
                except Interrupted as err:
                    raise Interrupted(err.signum, err.step, err.run_dir, again=(
                        f"{task.name} is unfinished; continue with the same command: {again} (finished tasks "
                        f"are kept, {task.name} starts over)")) from None
            result = task_result(task, work)
            write_json(work / TASK_RESULT_FILE, result)
            pending.remove(task.name)
            log(f"{step}: lr {result['lr']:g}, test top-1 {100 * result['test_top1']:.2f}% ({result['wall_s']:.0f} s)")
            summarize(out, settings, pending)  # the partial results, after every task
        return summarize(out, settings, pending)
