"""Transfer: fine-tune a pre-trained model on new classes at a new resolution (paper Sec. 3.2, App. B.1.1).

The pre-trained head (and the pre-logits layer unless kept) gives way to a zero-initialised
head for the new classes, and the position embeddings are resampled to the new patch grid
(by default the official code's corner-aligned linear zoom, ``"scipy"``; `surgery.py`). Training is the one
loop of ``vitlab.train`` with the ``finetune`` recipe: the run's ``init_from`` names the
checkpoint and ``train_blocks`` what is trained. ``finetune`` sweeps learning rates on a held-out
minival, then trains the best one on the whole training set and reports test accuracy.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .checkpoint import write_json
from .config import replace_checked
from .evaluate import evaluate_checkpoint
from .hub import is_pretrained_name, load_model, model_file
from .models import get_spec, list_models
from .recipes import recipe
from .run import LAST_FILE
from .train import train
from .trainconfig import TrainConfig, override

LR_SWEEP = (0.001, 0.003, 0.01, 0.03)  # the paper's fine-tuning sweep (Appendix B.1.1)
MINIVAL = 0.02  # fraction of the training set held out to choose the learning rate, as in the paper
SUMMARY_FILE = "finetune.json"


def _preset_for(cfg: Any, named: str | None) -> str:
    """The registered preset to describe ``cfg`` from: ``named`` if it is one, else the closest
    (fewest differing fields), so the run's ``model_overrides`` stay short."""
    names = [n for n in list_models() if type(get_spec(n).config) is type(cfg)]
    if not names:
        raise ValueError(f"no registered model is built from a {type(cfg).__name__}")
    if named in names:
        return named
    fields = [f.name for f in dataclasses.fields(cfg) if f.name != "num_classes"]
    return min(names, key=lambda n: sum(getattr(get_spec(n).config, f) != getattr(cfg, f) for f in fields))


def finetune_config(checkpoint: str | os.PathLike, data: str, *, image_size: int | None = None,
                    posemb_mode: str = "scipy", keep_pre_logits: bool = False, train_blocks: int = -1,
                    recipe_name: str = "finetune", **overrides: Any) -> TrainConfig:
    """The ``recipe_name`` recipe (``finetune``, or ``vtab``) for ``checkpoint`` on ``data``: its architecture at
    ``image_size`` (default: the checkpoint's), started from its weights; ``overrides`` as in
    ``vitlab.trainconfig.override``."""
    named = isinstance(checkpoint, str) and not Path(checkpoint).exists() and is_pretrained_name(checkpoint)
    loaded = load_model(checkpoint)
    pre = loaded.config
    changes: dict[str, Any] = {"image_size": image_size or pre.image_size}
    if hasattr(pre, "posemb_mode"):  # ViTs and hybrids; a BiT ResNet has no position embeddings
        changes["posemb_mode"] = posemb_mode
    if hasattr(pre, "representation_size"):
        changes["representation_size"] = pre.representation_size if keep_pre_logits else None
    target = replace_checked(pre, **changes)
    preset = _preset_for(pre, loaded.meta.get("model"))
    base = get_spec(preset).config
    model_overrides = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)
                       if f.name != "num_classes" and getattr(target, f.name) != getattr(base, f.name)}
    cfg = dataclasses.replace(recipe(recipe_name), model=preset, model_overrides=model_overrides,
                              init_from=checkpoint if named else str(model_file(checkpoint).resolve()),
                              train_blocks=train_blocks)
    return override(cfg, path=data, **overrides)


@dataclass
class FinetuneResult:
    """The sweep (lr, minival top-1, run directory), the chosen lr, and the final run's test accuracy."""

    out: Path
    sweep: list[dict[str, Any]]
    lr: float
    test_top1: float
    test_top5: float
    eval_split: str
    final_run: Path
    wall_s: float


def finetune(cfg: TrainConfig, out: str | os.PathLike, lrs: list[float] | tuple[float, ...] = LR_SWEEP, *,
             minival: float = MINIVAL, sweep_data: str | None = None,
             log: Callable[[str], None] = tqdm.write) -> FinetuneResult:
    """Fine-tune ``cfg`` (see ``finetune_config``): with several ``lrs``, each trains into
    ``out/lr_<lr>`` on the training set minus a stratified ``minival`` share (or on the train split
    of ``sweep_data``, evaluated on its val split: VTAB's 800 + 200 images) and the best on minival
    is chosen; the chosen lr then trains on the whole training set into ``out/final``, which is
    evaluated on the test split (val where there is no test). Writes ``out/finetune.json``."""
    start = time.perf_counter()
    out = Path(out)
    lrs = list(dict.fromkeys(lrs))
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"learning rates must be positive, got {list(lrs)}")
    if (out / SUMMARY_FILE).exists():
        raise ValueError(f"{out} already holds a fine-tuning run; pass another --out")
    sweep = []
    if len(lrs) > 1:
        for lr in lrs:
            held_out = dict(path=sweep_data, val_split=0.0) if sweep_data else dict(val_split=minival)
            run = train(override(cfg, lr=lr, **held_out), out / f"lr_{lr:g}", log=log)
            if sweep_data and (run.eval or {}).get("eval_split") != "val":
                raise ValueError(f"{sweep_data} has no val split to choose the learning rate on; add {sweep_data}/val")
            top1 = run.eval["eval_top1"] if run.eval else float("nan")
            sweep.append({"lr": lr, "minival_top1": top1, "run": str(run.run_dir)})
            log(f"lr {lr:g}: minival top-1 {100 * top1:.2f}%")
        best = max(sweep, key=lambda s: s["minival_top1"])["lr"]  # the first of equals: the smaller lr
        log(f"chosen lr {best:g}; training it on the whole training set")
    else:
        best = lrs[0]
    final = train(override(cfg, lr=best, val_split=0.0), out / "final", log=log)
    if final.eval and final.eval["eval_split"] == "test":
        top1, top5, split = final.eval["eval_top1"], final.eval["eval_top5"], "test"
    else:  # the loop evaluated on a val folder: measure the test split now
        result, split = evaluate_checkpoint(final.run_dir / LAST_FILE, data=cfg.data.path,
                                            classes=cfg.data.classes or None, log=log)
        top1, top5 = result.top1, result.top5
    result = FinetuneResult(out, sweep, best, top1, top5, split, final.run_dir, time.perf_counter() - start)
    write_json(out / SUMMARY_FILE, {
        "init_from": cfg.init_from, "data": cfg.data.path, "model": cfg.model, "model_overrides":
        cfg.model_overrides, "steps": cfg.steps, "batch_size": cfg.batch_size,
        **({"sweep_data": sweep_data} if sweep_data else {"minival": minival}),
        "sweep": sweep, "lr": best, f"{split}_top1": top1, f"{split}_top5": top5, "final_run": str(final.run_dir),
        "wall_s": round(result.wall_s, 1)})
    return result
