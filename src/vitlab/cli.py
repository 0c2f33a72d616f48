"""``vitlab <verb>``: parse arguments and call the library; nothing else lives here."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .errors import Interrupted, TrainingDiverged

# Each command imports what it needs when it runs: `vitlab --help` starts without torch.


def cmd_models(args: argparse.Namespace) -> int:
    """Print every preset: parameters, GFLOPs per image, tokens, resolution."""
    import torch

    from .config import as_pair
    from .flops import count_flops
    from .models import build_model, get_spec, list_models

    print(f"{'model':<16}{'params':>14}{'GFLOPs':>10}{'tokens':>8}  {'resolution':<11}description")
    for name in list_models(args.filter):
        spec = get_spec(name)
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            model = build_model(spec.config)
        params = sum(p.numel() for p in model.parameters())
        h, w = as_pair(spec.config.image_size)
        tokens = getattr(spec.config, "num_patches", 0) + getattr(spec.config, "num_prefix_tokens", 0)
        gflops = count_flops(model) / 1e9
        print(f"{name:<16}{params:>14,}{gflops:>10.2f}{tokens:>8}  {f'{h}x{w}':<11}{spec.description}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Attention maps for the given images, the paper's Fig. 7 panels, and an HTML report."""
    from .inspect import inspect_checkpoint

    report = inspect_checkpoint(
        _model_ref(args), args.images, args.out, data=args.data, head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio, start_layer=args.start_layer, num_images=args.num_images,
        device=args.device, log=lambda message: print(message, file=sys.stderr),
    )
    print(f"wrote {report}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Import a foreign checkpoint (official / big_vision / timm / hf) into a vitlab model file."""
    from .checkpoint import save_model
    from .hub import entry_for, load_entry
    from .interop import convert
    from .models import list_models, model_config

    overrides = {k: v for k, v in (("num_heads", args.num_heads), ("image_size", args.image_size),
                                   ("mean", args.mean and tuple(args.mean)), ("std", args.std and tuple(args.std)))
                 if v is not None}
    if args.model and args.model not in list_models():  # a released model: read the file as that entry
        loaded = load_entry(entry_for(args.model), Path(args.src))
        save_model(loaded.model, args.dst, class_names=loaded.class_names,
                   meta={**loaded.meta, "converted_from": str(args.src)})
        print(f"read {args.src} as {args.model}: {loaded.config.num_classes} classes, preprocessing "
              f"{loaded.meta['preprocess']}")
        print(f"wrote {args.dst}")
        return 0
    like = model_config(args.model) if args.model else None
    report = convert(args.src, args.dst, args.fmt, like=like, **overrides)
    print(report)
    print(f"wrote {args.dst}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a vitlab model to timm, Hugging Face, official .npz, ONNX or OpenVINO (fp32 or INT8)."""
    from .hub import load_model
    from .interop import export_model

    if args.model:
        if len(args.paths) != 1:
            raise ValueError(f"with --model, give only the destination (got {' '.join(args.paths)})")
        ref, dst = args.model, args.paths[0]
    elif len(args.paths) == 2:
        ref, dst = args.paths
    else:
        raise ValueError("give the model file (or --model NAME) and the destination: vitlab export MODEL DST")
    loaded = load_model(ref)
    suffix = Path(dst).suffix.lower()
    runtime = {"openvino": "openvino", "onnx": "onnxruntime"}.get(args.to) or {".xml": "openvino",
                                                                              ".onnx": "onnxruntime"}.get(suffix)
    if runtime:
        return export_for_runtime(loaded, dst, runtime, args)
    if args.int8 or args.data:
        raise ValueError(f"--int8 and --data are for ONNX (.onnx) and OpenVINO (.xml) exports, not {dst}")
    path = export_model(loaded.model, dst, args.to, class_names=loaded.class_names)
    print(f"wrote {path}")
    return 0


def export_for_runtime(loaded, dst: str, runtime: str, args: argparse.Namespace) -> int:
    """ONNX or OpenVINO, INT8 if asked (calibrated on --data's train images), then what it cost."""
    import torch

    from . import deploy
    from .evaluate import split_loader

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    calibration = None
    if args.int8 and runtime == "openvino":
        if not args.data:
            raise ValueError("OpenVINO INT8 calibrates on images: pass --data PATH (its train split; "
                             f"--calibration-images {deploy.CALIBRATION_IMAGES} by default)")
        loader, _, _ = split_loader(loaded, args.data, "train", batch_size=64, log=log)
        n = args.calibration_images or deploy.CALIBRATION_IMAGES
        calibration = torch.cat([x for x, _ in deploy.take(loader.epoch(0), n)])
    path = deploy.export(loaded, dst, to=runtime, int8=args.int8, calibration=calibration,
                         dynamic_size=args.dynamic_size, check=not args.no_check)
    what = f"{runtime}{', INT8' if args.int8 else ''}"
    if args.no_check:
        print(f"wrote {path} ({what})")
        return 0
    if args.data:  # held-out images: test, else val
        loader, split, _ = split_loader(loaded, args.data, None, batch_size=64, log=log)
        batches, where = deploy.take(loader.epoch(0), args.check_images), f" ({split} split of {args.data})"
    else:
        batches, where = None, " (random; pass --data for accuracy)"
    exported = deploy.load_exported(path, runtime=runtime)
    print(f"wrote {path} ({what}); {deploy.check_export(loaded.model, exported.model, batches).line()}{where}")
    return 0


# ---------------------------------------------------------------- hub

def _model_ref(args: argparse.Namespace) -> str:
    """The model a verb reads: ``--model NAME`` or the positional run directory / model file."""
    ref = getattr(args, "model", None) or getattr(args, "checkpoint", None)
    if not ref:
        raise ValueError("no model given: pass a run directory, a model file, or --model NAME (`vitlab hub list`)")
    return ref


def _is_cached(entry) -> bool:
    from .hub import cache, hf

    if entry.kind == "gcs":
        return cache.cache_path("gcs", entry.source["gcs"]).is_file()
    if entry.kind == "hf":
        from huggingface_hub import try_to_load_from_cache

        repo, rev = entry.source["hf"], entry.source.get("revision", "main")
        return (hf.imported_dir(repo, rev) / "config.json").is_file() or \
            isinstance(try_to_load_from_cache(repo, "config.json", revision=rev), str)
    return True  # in the package


def catalog_table(entries: list) -> str:
    """The catalog as a markdown table (the README's "Pretrained models" table is this output)."""
    rows = ["| name | px | classes | labels | published top-1 | from |", "|---|---|---|---|---|---|"]
    for e in entries:
        acc = e.accuracy
        top1 = f"{acc['top1']:.2f} ({acc['data']} {acc['split']})" if acc else "-"
        source = {"gcs": "official bucket", "hf": f"HF `{e.source.get('hf')}`", "package": "in the package"}[e.kind]
        rows.append(f"| `{e.name}` | {e.image_size} | {e.num_classes} | {e.labels or '-'} | {top1} | {source} |")
    return "\n".join(rows)


def _estimated_size(entry) -> str:
    """The download size a catalog entry without one will have: float32 weights of its architecture."""
    import torch

    from .models import create_model

    if not entry.architecture:
        return "not in the catalog"
    with torch.device("meta"):  # no memory: only the shapes
        model = create_model(entry.architecture, num_classes=entry.num_classes or None,
                             image_size=entry.image_size or None)
    n = sum(p.numel() for p in model.parameters())
    return f"~{4 * n / 2**20:,.0f} MiB (not in the catalog: float32 weights of {n / 1e6:.1f}M parameters)"


def cmd_hub(args: argparse.Namespace) -> int:
    """The released models: list, info, download, import, cache."""
    from . import hub
    from .hub import augreg, cache
    from .hub.catalog import preprocess_dict

    if args.hub_command == "list" and args.augreg:
        rows = augreg.pick(augreg.read_index(), upstream=args.upstream, downstream=args.downstream,
                           resolution=args.resolution, model=args.arch)
        if args.json:
            print(json.dumps(rows))
            return 0
        print(f"{'name':<10}{'ds':<6}{'aug':<10}{'wd':>6}{'do':>5}{'sd':>5}{'up val':>8}  {'adapt_ds':<18}"
              f"{'res':>5}{'lr':>7}{'steps':>7}{'test':>8}  adapt_filename")
        for r in rows:
            print(f"{r['name']:<10}{r['ds']:<6}{r['aug']:<10}{r['wd']:>6g}{r['do']:>5g}{r['sd']:>5g}"
                  f"{100 * r['final_val']:>7.2f}%  {r['adapt_ds']:<18}{r['adapt_resolution']:>5}{r['adapt_lr']:>7g}"
                  f"{r['adapt_steps']:>7}{100 * r['adapt_final_test']:>7.2f}%  augreg:{r['adapt_filename']}")
        print(f"{len(rows)} rows (the official colab's pick: best upstream by validation, best adaptation per data "
              f"set and resolution); load any with its augreg:<file> name", file=sys.stderr)
        return 0
    if args.hub_command == "list":
        names = hub.list_pretrained(args.pattern or "")
        if not names:
            raise ValueError(f"no released model matches {args.pattern!r}; see `vitlab hub list`")
        entries = [hub.entry_for(n) for n in names]
        if args.json:
            print(json.dumps([{**e.to_dict(), "cached": _is_cached(e)} for e in entries]))
            return 0
        if args.markdown:
            print(catalog_table(entries))
            return 0
        print(f"{'name':<38}{'res':>5}{'classes':>8}  {'labels':<17}{'top-1':>7}  {'from':<8}{'cached':<7}")
        for e in entries:
            top1 = f"{e.accuracy['top1']:.2f}" if e.accuracy else "-"
            print(f"{e.name:<38}{e.image_size:>5}{e.num_classes:>8}  {e.labels or '-':<17}{top1:>7}  {e.kind:<8}"
                  f"{'yes' if _is_cached(e) else '':<7}")
        return 0
    if args.hub_command == "info":
        e = hub.entry_for(args.name)
        info = {**e.to_dict(), "cached": _is_cached(e),
                "url": cache.gcs_url(e.source["gcs"]) if e.kind == "gcs" else
                f"https://huggingface.co/{e.source['hf']}" if e.kind == "hf" else "(in the package)"}
        if args.json:
            print(json.dumps(info))
            return 0
        p = preprocess_dict(e.preprocess)
        acc = e.accuracy
        lines = [("name", e.name), ("description", e.description), ("architecture", e.architecture),
                 ("source", info["url"]), ("format", e.format),
                 ("size", f"{e.size:,} bytes" if e.size else _estimated_size(e)),
                 ("sha256", e.sha256 or "not published (recorded at the first download)"),
                 ("resolution", f"{e.image_size} px"), ("classes", f"{e.num_classes} ({e.labels or 'no label list'})"),
                 ("preprocessing", f"resize {p['resize']} side, crop {p['crop_pct']:g}, {p['interpolation']}, "
                                   f"mean {p['mean']}, std {p['std']}"),
                 ("license", e.license or "-"),
                 ("accuracy", f"{acc['top1']:.2f}% top-1 on {acc['data']} {acc.get('split', '')} "
                              f"({acc.get('source', '')})" if acc else "not published"),
                 ("cached", "yes" if info["cached"] else "no")]
        for key, value in lines:
            print(f"{key + ':':<15}{value}")
        return 0
    if args.hub_command == "download":
        for name in args.names:
            path = hub.fetch(hub.entry_for(name))
            print(f"{name}: {path}")
        return 0
    if args.hub_command == "import":
        path = hub.import_file(args.file, args.name)
        print(f"imported {args.file} as {args.name}: {path}")
        return 0
    # cache
    if args.prune:
        removed = cache.prune(everything=args.all, match=args.match or "")
        print(f"removed {len(removed)} file(s) from {cache.home()}")
        for f in removed:
            print(f"  {f}")
        return 0
    files = cache.cached_files()
    for f in files:
        print(f"{f.size / 2**20:>10.1f} MiB  {f.state:<11}{f.path.relative_to(cache.home())}")
    print(f"{len(files)} file(s), {sum(f.size for f in files) / 2**20:.1f} MiB in {cache.home()}"
          f"{' (offline mode)' if cache.offline() else ''}; Hugging Face files are in huggingface_hub's cache "
          f"(`hf cache ls`)")
    return 0


# ---------------------------------------------------------------- train / eval / predict

def _model_config_types() -> list[type]:
    """The config classes of all registered models (their fields become model options)."""
    from .models import get_spec, list_models

    types: list[type] = []
    for name in list_models():
        t = type(get_spec(name).config)
        if t not in types:
            types.append(t)
    return types


def add_train_options(p: argparse.ArgumentParser) -> list[str]:
    """One option per config field: TrainConfig, OptimConfig, DataConfig and the model configs."""
    from .data import DataConfig
    from .optim import OptimConfig
    from .options import add_options
    from .trainconfig import DERIVED_DATA_FIELDS, TrainConfig

    names = add_options(p.add_argument_group("training (TrainConfig)"), TrainConfig)
    names += add_options(p.add_argument_group("optimisation (OptimConfig)"), OptimConfig)
    names += add_options(p.add_argument_group("data (DataConfig)"), DataConfig, exclude=DERIVED_DATA_FIELDS,
                         rename={"path": "data"})
    group = p.add_argument_group("model (fields of the model's config, default: the --model or recipe's preset, "
                                 "see `vitlab models`; image size, mean and std also set the data's)")
    for cls in _model_config_types():
        names += add_options(group, cls, exclude=("num_classes", "in_channels", *names), show_defaults=False)
    return names


def cmd_train(args: argparse.Namespace) -> int:
    """Train from scratch (or continue a run): a progress bar, metrics.jsonl, curves.png, checkpoints."""
    from .distributed import print0
    from .recipes import RECIPES, recipe
    from .run import BEST_FILE, CURVES_FILE, LAST_FILE
    from .train import resume, train
    from .trainconfig import TrainConfig, override

    if args.list_recipes:
        for name, r in RECIPES.items():
            print(f"{name:<20}{r.description}\n{'':<20}source: {r.source}")
        return 0
    overrides = {k: getattr(args, k) for k in args.config_options if hasattr(args, k)}
    if args.resume:
        if args.recipe or args.out:
            raise ValueError("--resume RUN continues RUN as configured; it takes no --recipe or --out")
        result = resume(args.resume, **overrides)
    else:
        cfg = override(recipe(args.recipe) if args.recipe else TrainConfig(), **overrides)
        out = args.out or f"runs/{args.recipe or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = train(cfg, out)
    run = result.run_dir
    if result.eval:
        e = result.eval
        print0(f"{e['eval_split']} accuracy after {result.step} steps: top-1 {100 * e['eval_top1']:.2f}%, "
               f"top-5 {100 * e['eval_top5']:.2f}% (best top-1 {100 * (result.best_top1 or 0):.2f}%)")
    print0(f"model: {run / LAST_FILE}" + (f", best: {run / BEST_FILE}" if (run / BEST_FILE).exists() else ""))
    print0(f"plots: {run / CURVES_FILE}; metrics: {run / 'metrics.jsonl'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Top-1, top-5, per-class accuracy and a confusion-matrix PNG for a checkpoint or run."""
    from .evaluate import evaluate_checkpoint
    from .plots import plot_confusion

    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    ref = _model_ref(args)
    result, split = evaluate_checkpoint(ref, data=args.data, split=args.split,
                                        batch_size=args.batch_size, device=args.device, precision=args.precision,
                                        progress=not args.json, flip_tta=args.flip_tta, runtime=args.runtime,
                                        real_labels=args.real_labels, classes=args.classes, log=log)
    target = Path(ref)
    folder = target if target.is_dir() else target.parent if target.exists() else Path(".")
    try:
        png = plot_confusion(result.confusion, result.class_names, folder / f"confusion_{split}.png",
                             title=f"{target.name}: {split} top-1 {100 * result.top1:.2f}%")
    except OSError as err:  # a read-only run folder: the metrics still print
        png = None
        log(f"could not write the confusion matrix into {folder} ({err.strerror or err}); metrics follow")
    if args.json:
        print(json.dumps({"checkpoint": ref, "split": split, **result.to_dict(),
                          "confusion_png": png and str(png)}))
        return 0
    print(f"{'class':<24}{'accuracy':>10}{'images':>9}")
    for name, acc, n in zip(result.class_names, result.per_class, result.confusion.sum(1).tolist()):
        print(f"{name:<24}{'-' if acc is None else f'{100 * acc:.2f}%':>10}{n:>9}")
    print(f"{split}: {result.num_images} images, top-1 {100 * result.top1:.2f}%, top-5 {100 * result.top5:.2f}%, "
          f"loss {result.loss:.4f}")
    if result.real is not None:
        r = result.real
        print(f"ReaL: {r.num_images} images with a ReaL label ({r.num_skipped} without one left out), "
              f"ReaL top-1 {100 * r.top1:.2f}% (original top-1 {100 * result.top1:.2f}% on all {result.num_images})")
    if png is not None:
        print(f"confusion matrix: {png}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k labels with probabilities per image; a directory writes every image's row to CSV."""
    import torch

    from .accel import optimize
    from .deploy import runtime_for
    from .distributed import resolve_device
    from .hub import load_model
    from .predict import image_files, predict, write_csv

    ref, images = (args.model, args.paths) if args.model else (args.paths[0], args.paths[1:])
    if not images:
        raise ValueError("no images given: vitlab predict MODEL IMAGE... (or --model NAME IMAGE...)")
    loaded = load_model(ref, map_location=resolve_device(args.device), runtime=args.runtime, precision=args.precision)
    if args.precision == "bf16" and not runtime_for(ref, args.runtime):
        optimize(loaded.model, torch.bfloat16)  # the bf16 fast path
    files, any_dir = image_files(images)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    predictions = predict(loaded, files, top_k=args.top_k, batch_size=args.batch_size, skip_unreadable=any_dir,
                          log=log)
    if any_dir or args.output:
        if args.output:
            with open(args.output, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
                write_csv(predictions, f)
            log(f"wrote {len(predictions)} predictions to {args.output}")
        else:
            write_csv(predictions, sys.stdout)
        return 0
    for p in predictions:
        shown = (f'"{label}"' if "," in label else label for label in p.labels)  # WordNet lemmas hold commas
        print(f"{p.path}: " + ", ".join(f"{label} {prob:.3f}" for label, prob in zip(shown, p.probs)))
    return 0


# ---------------------------------------------------------------- fewshot / finetune

def parse_list(text: str, cast: type, what: str) -> list:
    """``"1,5,10"`` -> ``[1, 5, 10]``; a bad item is a ValueError naming it."""
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"cannot read {what} {text!r}; write comma-separated numbers, e.g. 1,5,10") from None
    if not values:
        raise ValueError(f"{what} is empty; write comma-separated numbers, e.g. 1,5,10")
    return values


def cmd_fewshot(args: argparse.Namespace) -> int:
    """Few-shot linear evaluation of frozen features: accuracy mean and std over seeds per k."""
    from .fewshot import fewshot_checkpoint
    from .distributed import resolve_device

    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    report = fewshot_checkpoint(
        args.checkpoint, args.data, shots=parse_list(args.shots, int, "--shots"), seeds=args.seeds,
        feature=args.feature, l2=args.l2, probe=args.probe, batch_size=args.batch_size,
        device=resolve_device(args.device), cache_dir=args.cache_dir, classes=tuple(args.classes or ()),
        progress=not args.json, log=log)
    cached = ", ".join(f"{split} {'from the cache' if n == 0 else f'{n} computed'}"
                       for split, n in report.computed.items())
    log(f"features: {cached}")
    print(json.dumps(report.to_dict()) if args.json else report.table())
    return 0


# Model fields a fine-tuning run may change (the architecture is the checkpoint's).
FINETUNE_MODEL_FIELDS = ("dropout", "attention_dropout", "drop_path", "head_dropout", "fused_attention")


def add_finetune_options(p: argparse.ArgumentParser, base_recipe: str = "finetune") -> list[str]:
    """The training options that make sense for fine-tuning, with the ``base_recipe``'s defaults."""
    from .config import ViTConfig
    from .data import DataConfig
    from .optim import OptimConfig
    from .options import add_options
    from .recipes import recipe
    from .trainconfig import DERIVED_DATA_FIELDS, TrainConfig

    base = recipe(base_recipe)
    names = add_options(p.add_argument_group("training (TrainConfig)"), TrainConfig, defaults=base,
                        exclude=("model", "epochs", "time_budget", "init_from", "train_blocks"))
    names += add_options(p.add_argument_group("optimisation (OptimConfig)"), OptimConfig, defaults=base.optim,
                         exclude=("lr",))
    names += add_options(p.add_argument_group("data (DataConfig)"), DataConfig, defaults=base.data,
                         exclude=(*DERIVED_DATA_FIELDS, "path", "val_split"))
    model_fields = [f.name for f in dataclasses.fields(ViTConfig) if f.name not in FINETUNE_MODEL_FIELDS]
    names += add_options(p.add_argument_group("model regularisation"), ViTConfig, exclude=tuple(model_fields))
    return names


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a checkpoint on new data: lr sweep on a minival, then the chosen lr on all of train."""
    from .transfer import finetune, finetune_config

    if args.freeze == "backbone" and args.train_blocks not in (None, 0):
        raise ValueError(f"--freeze backbone trains the head only, but --train-blocks {args.train_blocks} "
                         f"trains blocks too; pass one of them")
    train_blocks = 0 if args.freeze == "backbone" else (-1 if args.train_blocks is None else args.train_blocks)
    overrides = {k: getattr(args, k) for k in args.config_options if hasattr(args, k)}
    cfg = finetune_config(args.checkpoint, args.data, image_size=args.image_size, posemb_mode=args.posemb_mode,
                          keep_pre_logits=args.keep_pre_logits, train_blocks=train_blocks, **overrides)
    lrs = parse_list(args.lr, float, "--lr")
    out = args.out or f"runs/finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    result = finetune(cfg, out, lrs, minival=args.minival)
    if result.sweep:
        print(f"{'lr':>8}{'minival top-1':>16}")
        for s in result.sweep:
            print(f"{s['lr']:>8g}{100 * s['minival_top1']:>15.2f}%" + ("  <- chosen" if s["lr"] == result.lr else ""))
    print(f"lr {result.lr:g} on the whole training set: {result.eval_split} top-1 {100 * result.test_top1:.2f}%, "
          f"top-5 {100 * result.test_top5:.2f}% ({result.wall_s:.0f} s)")
    print(f"model: {result.final_run / 'last.safetensors'}; summary: {result.out / 'finetune.json'}")
    return 0


def cmd_vtab(args: argparse.Namespace) -> int:
    """VTAB-1k: per task an lr sweep on 800 + 200 images, the best on all 1,000, test top-1; group means."""
    from .vtab import vtab

    overrides = {k: getattr(args, k) for k in args.config_options if hasattr(args, k)}
    out = args.out or f"runs/vtab-{time.strftime('%Y%m%d-%H%M%S')}"
    only = parse_list(args.only, str, "--only") if args.only else None
    result = vtab(args.checkpoint, args.tasks, out, parse_list(args.lr, float, "--lr"), image_size=args.image_size,
                  only=only, **overrides)
    print(result.table())
    print(f"results: {result.json_path}" + (f"; chart: {result.png_path}" if result.png_path else ""))
    return 0


# ---------------------------------------------------------------- bench

def run_bench(args: argparse.Namespace, log: Callable[[str], None]):
    """The `vitlab bench` options run: the `vitlab.bench.Report`."""
    from . import bench

    cases = bench.QUICK_CASES if args.quick else bench.FULL_CASES
    cases = tuple(c for c in cases if any(part in c.name for part in args.cases.split(",")))
    if not cases:
        raise ValueError(f"no benchmark case matches {args.cases!r}; see `vitlab bench --help`")
    rounds = args.rounds or (3 if args.quick else 5)
    return bench.run(cases, rounds=rounds, target_s=0.3 if args.quick else 0.5, threads=args.threads,
                     compile=not (args.quick or args.no_compile), memory=not (args.quick or args.no_memory),
                     runtimes=not (args.quick or args.no_runtimes or args.clock == "cpu"),
                     data=args.data, epoch_batches=args.epoch_batches, clock=args.clock, log=log)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time vitlab (and timm and transformers where installed), interleaved; print (and save) the markdown report."""
    report = run_bench(args, log=lambda msg: print(msg, file=sys.stderr))
    print(report.text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report.text)
    return 0


# ---------------------------------------------------------------- serve

def cmd_serve(args: argparse.Namespace) -> int:
    """A web page and a JSON API for one model, until Ctrl-C (vitlab[serve])."""
    from .distributed import resolve_device
    from .hub import load_model
    from .serve.app import run_server
    from .serve.config import ServeConfig

    cfg = ServeConfig(**{k: getattr(args, k) for k in getattr(args, "config_options", []) if hasattr(args, k)})
    loaded = load_model(args.model, map_location=resolve_device(args.device))
    run_server(loaded, cfg, name=str(args.model), log=lambda msg: print(msg, flush=True))
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every verb; with ``command``, only that verb gets the options that need torch
    to build (those derived from the configs), so the others' help starts fast."""

    def wanted(name: str) -> bool:
        return command is None or command == name

    parser = argparse.ArgumentParser(prog="vitlab", description="The Vision Transformer, end to end.")
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.verbs = sub.choices  # name -> its parser (for `did you mean`)

    p = sub.add_parser("models", help="list model presets with parameters and FLOPs")
    p.add_argument("filter", nargs="?", default="", help="only names containing this")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("inspect", help="attention maps, position-embedding similarity, attention distance, report")
    p.add_argument("checkpoint", nargs="?", help="model file or run directory (or --model NAME)")
    p.add_argument("--model", help="a released model by name (`vitlab hub list`), e.g. vit_b16.augreg_in21k_ft_in1k")
    p.add_argument("--images", nargs="+", required=True, help="image files or folders to draw attention maps for")
    p.add_argument("--data", help="data set (CIFAR dir, image folder) for the mean attention distance (default: the --images)")
    p.add_argument("--out", required=True, help="output folder for the PNGs and report.html")
    p.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean", help="how rollout fuses heads")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="drop this fraction of the lowest weights per row")
    p.add_argument("--start-layer", type=int, default=0, help="first layer of the rollout")
    p.add_argument("--num-images", type=int, default=128, help="images for the mean attention distance")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="import official/big_vision/BiT .npz, timm or Hugging Face weights")
    p.add_argument("src", help=".npz file (ViT, hybrid or BiT), timm .safetensors/.pth, or a Hugging Face folder")
    p.add_argument("dst", help="the vitlab model file to write (.safetensors)")
    p.add_argument("--from", dest="fmt", choices=["official", "big_vision", "bit", "timm", "hf"],
                   help="force the format")
    p.add_argument("--model", help="check the checkpoint against this preset's architecture, or read it as this "
                                   "released model (its labels and preprocessing go into the file)")
    p.add_argument("--num-heads", type=int, help="heads (timm state dicts do not record them)")
    p.add_argument("--image-size", type=int, help="input size, when the checkpoint cannot tell it")
    p.add_argument("--mean", type=float, nargs=3, help="input normalisation mean (R G B)")
    p.add_argument("--std", type=float, nargs=3, help="input normalisation std (R G B)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="export a vitlab model to timm, Hugging Face, .npz, ONNX or OpenVINO (INT8 too)")
    p.add_argument("paths", nargs="+", metavar="[MODEL] DST",
                   help="a vitlab model file or run directory (or --model NAME), then the destination: "
                        ".safetensors/.pth (timm), a folder (Hugging Face), .npz (official; BiT's for a BiT model), "
                        ".onnx (ONNX Runtime) or .xml (OpenVINO IR, with its .bin)")
    p.add_argument("--model", help="a released model by name (`vitlab hub list`), e.g. vit_b16.augreg_in21k_ft_in1k")
    p.add_argument("--to", choices=["official", "big_vision", "bit", "timm", "hf", "onnx", "openvino"],
                   help="force the format")
    p.add_argument("--int8", action="store_true",
                   help="ONNX: dynamic INT8 quantisation (ONNX Runtime); OpenVINO: post-training INT8 (NNCF), "
                        "calibrated on --data")
    p.add_argument("--data", help="ONNX/OpenVINO: labelled data; calibration from its train split, and the "
                                  "export's top-1 and agreement with PyTorch measured on its test (or val) split")
    p.add_argument("--calibration-images", type=int, help="OpenVINO INT8: train images to calibrate on (default 300)")
    p.add_argument("--check-images", type=int, default=1000,
                   help="with --data: held-out images the export is checked on (0: all)")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: any batch size (always on now; kept for scripts)")
    p.add_argument("--dynamic-size", action="store_true", help="ONNX: any image size (a multiple of the patch)")
    p.add_argument("--no-check", action="store_true", help="ONNX/OpenVINO: skip the comparison with PyTorch")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("train", help="train a model from scratch (or --resume a run)", allow_abbrev=False,
                       description="Train from scratch. Every config field is an option; a recipe sets the "
                                   "starting values. Writes config.json, metrics.jsonl, curves.png, "
                                   "last/best.safetensors and state.pt into the run directory.")
    p.add_argument("--recipe", help="start from a named recipe (see --list-recipes)")
    p.add_argument("--out", metavar="RUN", help="run directory (default runs/<recipe>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN exactly")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes and their sources")
    p.set_defaults(func=cmd_train, config_options=add_train_options(p) if wanted("train") else [])

    p = sub.add_parser("eval", help="top-1/top-5/per-class accuracy and a confusion matrix", allow_abbrev=False)
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", nargs="?", help="a run directory or model file")
    p.add_argument("--model", help="a released model by name (`vitlab hub list`), e.g. vit_b16.augreg_in21k_ft_in1k")
    p.add_argument("--data", help="data path (default: the run's data)")
    p.add_argument("--split", choices=["test", "val", "train"], help="default: test if the data has one, else val")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast (PyTorch) or OpenVINO's bf16 inference")
    p.add_argument("--runtime", choices=["auto", "torch", "onnxruntime", "openvino"], default="auto",
                   help="what runs the model: auto = by file (.onnx: ONNX Runtime, .xml: OpenVINO, else PyTorch)")
    p.add_argument("--flip-tta", action="store_true",
                   help="average the logits of each image and its mirror image (test-time augmentation)")
    p.add_argument("--real-labels", metavar="REAL_JSON",
                   help="ImageNet-ReaL: the reassessed labels (google-research/reassessed-imagenet real.json, one "
                        "list per validation image in sorted file-name order); adds ReaL top-1")
    p.add_argument("--classes", type=int, nargs="+", metavar="INT",
                   help="only these class indices of the data, relabelled 0..k-1 in this order, e.g. 5 6 7 8 9 "
                        "(default: a run's own --classes, else all)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k labels with probabilities for images", allow_abbrev=False)
    p.add_argument("paths", metavar="[CHECKPOINT] IMAGE", nargs="+",
                   help="a model file or run directory (unless --model), then image files or directories (-> CSV)")
    p.add_argument("--model", help="a released model by name (`vitlab hub list`), e.g. vit_b16.augreg_in21k_ft_in1k")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--output", metavar="CSV", help="write CSV here (a directory argument prints CSV by default)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: vitlab's bf16 fast path (PyTorch) or OpenVINO's bf16 inference")
    p.add_argument("--runtime", choices=["auto", "torch", "onnxruntime", "openvino"], default="auto",
                   help="what runs the model: auto = by file (.onnx: ONNX Runtime, .xml: OpenVINO, else PyTorch)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("fewshot", help="few-shot linear evaluation of frozen features (the paper's ridge)",
                       allow_abbrev=False)
    p.add_argument("--from", "--model", dest="checkpoint", metavar="MODEL", required=True,
                   help="model file, run directory or released model name (`vitlab hub list`)")
    p.add_argument("--data", required=True, help="data with a train split and a test (or val) split")
    p.add_argument("--shots", default="1,5,10,25", help="examples per class, comma-separated (default 1,5,10,25)")
    p.add_argument("--seeds", type=int, default=3, help="random k-shot draws to average over (default 3)")
    p.add_argument("--feature", default="pre_logits", help="named intermediate, e.g. pre_logits, encoded, block_05")
    p.add_argument("--l2", type=float, default=1024.0, help="ridge regularisation (default 1024)")
    p.add_argument("--probe", choices=["logistic"], help="also fit a logistic-regression probe on the same shots")
    p.add_argument("--batch-size", type=int, default=256, help="images per feature-extraction batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--classes", type=int, nargs="+", metavar="INT",
                   help="only these class indices of the data, relabelled 0..k-1, e.g. 5 6 7 8 9 (default: all)")
    if wanted("fewshot"):
        from .fewshot import FEATURE_CACHE
        p.add_argument("--cache-dir", default=FEATURE_CACHE, help=f"extracted features are kept here ({FEATURE_CACHE})")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint on new classes at a new resolution (paper recipe)",
                       allow_abbrev=False,
                       description="Fine-tune as in the paper: new zero head, position embeddings resampled to "
                                   "the new grid, SGD momentum 0.9, warm-up + cosine, batch 512. Several --lr values "
                                   "are swept on a minival held out from train; the best is trained on all of train "
                                   "and evaluated on test. Writes RUN/lr_<lr>/, RUN/final/ and RUN/finetune.json.")
    p.add_argument("--from", "--model", dest="checkpoint", metavar="MODEL", required=True,
                   help="model file, run directory or released model name (`vitlab hub list`)")
    p.add_argument("--data", required=True, help="the new data (train and test splits)")
    p.add_argument("--image-size", type=int, help="fine-tuning resolution (default: the checkpoint's)")
    p.add_argument("--out", metavar="RUN", help="output directory (default runs/finetune-<time>)")
    if wanted("finetune"):
        from .transfer import LR_SWEEP, MINIVAL
        p.add_argument("--lr", default=",".join(map(str, LR_SWEEP)),
                       help="learning rate, or comma-separated values to sweep (default: the paper's %(default)s)")
        p.add_argument("--minival", type=float, default=MINIVAL, help="share of train that chooses the lr (%(default)s)")
    p.add_argument("--freeze", choices=["backbone"], help="train the head only (a linear probe by gradient descent)")
    p.add_argument("--train-blocks", type=int, metavar="K",
                   help="train only the last K blocks, the final norm and the head")
    p.add_argument("--keep-pre-logits", action="store_true", help="keep the pre-trained representation layer")
    p.add_argument("--posemb-mode", choices=["scipy", "bilinear", "bicubic"], default="scipy",
                   help="position-embedding resampling (default scipy: the official corner-aligned linear zoom)")
    p.set_defaults(func=cmd_finetune, config_options=add_finetune_options(p) if wanted("finetune") else [])

    p = sub.add_parser("vtab", help="VTAB-1k: fine-tune and test on each task folder; Natural / Specialized / "
                                    "Structured means", allow_abbrev=False,
                       description="VTAB-1k as in the paper (App. B.1.1): per task, each --lr trains on 800 of the "
                                   "1,000 training images and is scored on the other 200; the best trains on all "
                                   "1,000 and is tested. SGD momentum 0.9, batch 512, 2,500 steps (the vtab recipe). "
                                   "Prints a table and writes OUT/vtab.json and OUT/vtab.png; run it again with the "
                                   "same --out to continue (finished tasks are skipped).")
    p.add_argument("--model", "--from", dest="checkpoint", metavar="MODEL", required=True,
                   help="model file, run directory or released model name (`vitlab hub list`)")
    p.add_argument("--tasks", required=True, metavar="DIR",
                   help="one folder per task: TASK/train/<class>/<image> (1,000 images; or TASK/train800/ and "
                        "TASK/val200/) and TASK/test/<class>/<image>")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/vtab-<time>); the same --out continues it")
    p.add_argument("--image-size", type=int, help="fine-tuning resolution (default: the model's; the paper: 384)")
    p.add_argument("--only", metavar="TASK,...", help="only these task folders (comma-separated)")
    if wanted("vtab"):
        from .transfer import LR_SWEEP
        p.add_argument("--lr", default=",".join(map(str, LR_SWEEP)),
                       help="comma-separated learning rates swept per task on its 200 validation images (default "
                            "%(default)s; one value trains it on the 1,000 at once: the paper's 0.01)")
    p.set_defaults(func=cmd_vtab, config_options=add_finetune_options(p, "vtab") if wanted("vtab") else [])

    p = sub.add_parser("hub", help="released pretrained models: list, info, download, import, cache")
    hub_sub = p.add_subparsers(dest="hub_command", required=True)
    q = hub_sub.add_parser("list", help="the catalog (or, with --augreg, rows of the AugReg index.csv)")
    q.add_argument("pattern", nargs="?", help="only names containing this (or matching a * glob)")
    q.add_argument("--augreg", action="store_true", help="rows of the official AugReg index.csv, picked as its colab")
    q.add_argument("--upstream", help="--augreg: upstream data set (i21k, i1k)")
    q.add_argument("--downstream", help="--augreg: adaptation data set (imagenet2012, cifar100, oxford_iiit_pet, ...)")
    q.add_argument("--resolution", type=int, help="--augreg: adaptation resolution (224, 384)")
    q.add_argument("--arch", help="--augreg: model name as index.csv writes it (Ti/16, B/16, R26+S/32, ...)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--markdown", action="store_true", help="print a markdown table (as in the README)")
    q = hub_sub.add_parser("info", help="source, size, resolution, labels, preprocessing, license, accuracy")
    q.add_argument("name")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = hub_sub.add_parser("download", help="fetch into the cache (verified, resumable)")
    q.add_argument("names", nargs="+", metavar="NAME")
    q = hub_sub.add_parser("import", help="put a file carried by hand (air-gapped machines) into the cache, verified")
    q.add_argument("file", help="the downloaded file (a folder for Hugging Face entries)")
    q.add_argument("--name", required=True, help="the model it is, e.g. vit_b16.augreg_in21k")
    q = hub_sub.add_parser("cache", help="list the cache with sizes; --prune removes partial or unrecorded files")
    q.add_argument("match", nargs="?", help="with --prune: only paths containing this")
    q.add_argument("--prune", action="store_true", help="remove interrupted downloads and files without a record")
    q.add_argument("--all", action="store_true", help="with --prune: remove every cached file")
    p.set_defaults(func=cmd_hub)

    p = sub.add_parser("bench", help="speed of vitlab, and of timm, transformers, ONNX Runtime and OpenVINO where "
                                     "installed (vitlab[bench], vitlab[deploy])")
    p.add_argument("--quick", action="store_true", help="3 small cases, 3 rounds, no compile or memory (~1 min)")
    p.add_argument("--cases", default="", help="only cases whose name contains one of these comma-separated parts, e.g. 'vit_s16,train'")
    p.add_argument("--rounds", type=int, default=0, help="timing rounds (default 5, quick 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every variant")
    p.add_argument("--no-compile", action="store_true", help="leave out timm + torch.compile")
    p.add_argument("--no-runtimes", action="store_true",
                   help="leave out ONNX Runtime, OpenVINO and the INT8 paths (also left out by --quick and --clock cpu)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: thread CPU time, robust on a shared machine (needs --threads 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    p.add_argument("--data", help="CIFAR-10 folder: also time an end-to-end training epoch on it")
    p.add_argument("--epoch-batches", type=int, default=0, help="stop the epoch after this many batches (0: all)")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="a web page and an HTTP API for a model: predictions, attention (vitlab[serve])",
                       allow_abbrev=False)
    p.add_argument("--model", required=True, help="a released model's name, a run directory or a model file")
    p.add_argument("--device", default="auto")
    if wanted("serve"):
        from .options import add_options
        from .serve.config import ServeConfig
        p.set_defaults(config_options=add_options(p.add_argument_group("server (ServeConfig)"), ServeConfig))
    p.set_defaults(func=cmd_serve)
    return parser


# The optional extras of pyproject.toml and the modules each brings.
EXTRAS = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "deploy": ("openvino", "nncf"),
          "serve": ("fastapi", "uvicorn", "multipart")}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; a misspelt verb or option is an error that names the nearest ones."""
    verb = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command=verb)
    if verb and verb not in parser.verbs and (near := difflib.get_close_matches(verb, parser.verbs, n=3)):
        parser.error(f"unknown command {verb!r}; did you mean {' or '.join(near)}?")
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = parser.verbs[args.command]
        known = [o for action in sub._actions for o in action.option_strings]
        hints = [f"{name} -> {' / '.join(near)}" for name in (a.split("=")[0] for a in extra if a.startswith("--"))
                 if (near := difflib.get_close_matches(name, known, n=3, cutoff=0.7))]
        sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean: {'; '.join(hints)}?)" if hints else "")
                  + f"; see `vitlab {args.command} --help`")
    return args


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print escaped, never crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    received: list[int] = []

    def stop(signum: int, frame: object) -> None:  # SIGTERM outside the training loop: as Ctrl-C
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        args = parse_args(argv)  # a verb's options come from the configs: this imports torch
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"vitlab {command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only folder, a full disk, a path that is a file: one line, the path named
        where = f" ({err.filename})" if err.filename else ""
        print(f"vitlab {command}: error: {err.strerror or err}{where}; check the path, its permissions and "
              f"free space", file=sys.stderr)
        return 2
    except Interrupted as err:  # SIGINT / SIGTERM during training: a checkpoint was saved first
        from .distributed import print0
        print0(f"vitlab {command}: {err}", file=sys.stderr)
        return 128 + err.signum
    except TrainingDiverged as err:  # NaN / inf: the last good checkpoint is kept
        from .distributed import print0
        print0(f"vitlab {command}: error: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:  # an optional extra that is not installed
        extra = next((e for e, mods in EXTRAS.items() if (err.name or "").split(".")[0] in mods), None)
        if extra is None:
            raise
        print(f"vitlab {command}: error: this needs {err.name}, which is not installed: "
              f"pip install 'vitlab[{extra}]'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: stop quietly
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # before the loop started (start-up, data loading), or a second Ctrl-C
        name = "SIGTERM" if received else "Ctrl-C"
        print(f"vitlab {command}: interrupted ({name}) before anything was saved", file=sys.stderr)
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
