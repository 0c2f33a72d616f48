"""``vitlab <verb>``: parse arguments and call the library; nothing else lives here."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .config import as_pair
from .distributed import print0
from .fewshot import FEATURE_CACHE
from .transfer import LR_SWEEP, MINIVAL
from .flops import count_flops
from .inspect import inspect_checkpoint
from .models import build_model, get_spec, list_models
from .train import Interrupted, TrainingDiverged


def cmd_models(args: argparse.Namespace) -> int:
    """Print every preset: parameters, GFLOPs per image, tokens, resolution."""
    print(f"{'model':<16}{'params':>14}{'GFLOPs':>10}{'tokens':>8}  {'resolution':<11}description")
    for name in list_models(args.filter):
        spec = get_spec(name)
        model = build_model(spec.config)
        params = sum(p.numel() for p in model.parameters())
        h, w = as_pair(spec.config.image_size)
        tokens = getattr(spec.config, "num_patches", 0) + getattr(spec.config, "num_prefix_tokens", 0)
        gflops = count_flops(model) / 1e9
        print(f"{name:<16}{params:>14,}{gflops:>10.2f}{tokens:>8}  {f'{h}x{w}':<11}{spec.description}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Attention maps for the given images, the paper's Fig. 7 panels, and an HTML report."""
    report = inspect_checkpoint(
        args.checkpoint, args.images, args.out, data=args.data, head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio, start_layer=args.start_layer, num_images=args.num_images,
        device=args.device, log=lambda message: print(message, file=sys.stderr),
    )
    print(f"wrote {report}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Import a foreign checkpoint (official / big_vision / timm / hf) into a vitlab model file."""
    from .interop import convert
    from .models import model_config

    overrides = {k: v for k, v in (("num_heads", args.num_heads), ("image_size", args.image_size),
                                   ("mean", args.mean and tuple(args.mean)), ("std", args.std and tuple(args.std)))
                 if v is not None}
    like = model_config(args.model) if args.model else None
    report = convert(args.src, args.dst, args.fmt, like=like, **overrides)
    print(report)
    print(f"wrote {args.dst}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a vitlab model file to timm (.safetensors/.pth), Hugging Face (folder), .npz or ONNX."""
    from .checkpoint import load_model
    from .interop import export_model, export_onnx

    loaded = load_model(args.checkpoint)
    if Path(args.dst).suffix == ".onnx":
        diff = export_onnx(loaded.model, args.dst, dynamic_batch=args.dynamic_batch, dynamic_size=args.dynamic_size,
                           check=not args.no_check)
        print(f"wrote {args.dst}" + ("" if args.no_check else f" (onnxruntime vs PyTorch: max abs diff {diff:.2e})"))
        return 0
    path = export_model(loaded.model, args.dst, args.to, class_names=loaded.class_names)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- train / eval / predict

def _model_config_types() -> list[type]:
    """The config classes of all registered models (their fields become model options)."""
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
    from .train import DERIVED_DATA_FIELDS, TrainConfig

    names = add_options(p.add_argument_group("training (TrainConfig)"), TrainConfig)
    names += add_options(p.add_argument_group("optimisation (OptimConfig)"), OptimConfig)
    names += add_options(p.add_argument_group("data (DataConfig)"), DataConfig, exclude=DERIVED_DATA_FIELDS,
                         rename={"path": "data"})
    group = p.add_argument_group("model (fields of the model's config; image size, mean and std also set the data's)")
    for cls in _model_config_types():
        names += add_options(group, cls, exclude=("num_classes", "in_channels", *names))
    return names


def cmd_train(args: argparse.Namespace) -> int:
    """Train from scratch (or continue a run): a progress bar, metrics.jsonl, curves.png, checkpoints."""
    from .recipes import RECIPES, recipe
    from .train import BEST_FILE, CURVES_FILE, LAST_FILE, TrainConfig, override
    from .train import resume, train

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
    result, split = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split,
                                        batch_size=args.batch_size, device=args.device, precision=args.precision,
                                        progress=not args.json, flip_tta=args.flip_tta, log=log)
    target = Path(args.checkpoint)
    folder = target if target.is_dir() else target.parent
    png = plot_confusion(result.confusion, result.class_names, folder / f"confusion_{split}.png",
                         title=f"{target.name}: {split} top-1 {100 * result.top1:.2f}%")
    if args.json:
        print(json.dumps({"checkpoint": str(target), "split": split, **result.to_dict(), "confusion_png": str(png)}))
        return 0
    print(f"{'class':<24}{'accuracy':>10}{'images':>9}")
    for name, acc, n in zip(result.class_names, result.per_class, result.confusion.sum(1).tolist()):
        print(f"{name:<24}{'-' if acc is None else f'{100 * acc:.2f}%':>10}{n:>9}")
    print(f"{split}: {result.num_images} images, top-1 {100 * result.top1:.2f}%, top-5 {100 * result.top5:.2f}%, "
          f"loss {result.loss:.4f}")
    print(f"confusion matrix: {png}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k labels with probabilities per image; a directory writes every image's row to CSV."""
    from .checkpoint import load_model
    from .predict import image_files, predict, write_csv
    from .train import resolve_device

    loaded = load_model(args.checkpoint, map_location=resolve_device(args.device))
    files, any_dir = image_files(args.images)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    predictions = predict(loaded, files, top_k=args.top_k, batch_size=args.batch_size, skip_unreadable=any_dir,
                          log=log)
    if any_dir or args.output:
        if args.output:
            with open(args.output, "w", newline="") as f:
                write_csv(predictions, f)
            log(f"wrote {len(predictions)} predictions to {args.output}")
        else:
            write_csv(predictions, sys.stdout)
        return 0
    for p in predictions:
        print(f"{p.path}: " + ", ".join(f"{label} {prob:.3f}" for label, prob in zip(p.labels, p.probs)))
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
    from .train import resolve_device

    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    report = fewshot_checkpoint(
        args.checkpoint, args.data, shots=parse_list(args.shots, int, "--shots"), seeds=args.seeds,
        feature=args.feature, l2=args.l2, probe=args.probe, batch_size=args.batch_size,
        device=resolve_device(args.device), cache_dir=args.cache_dir, progress=not args.json, log=log)
    cached = ", ".join(f"{split} {'from the cache' if n == 0 else f'{n} computed'}"
                       for split, n in report.computed.items())
    log(f"features: {cached}")
    print(json.dumps(report.to_dict()) if args.json else report.table())
    return 0


# Model fields a fine-tuning run may change (the architecture is the checkpoint's).
FINETUNE_MODEL_FIELDS = ("dropout", "attention_dropout", "drop_path", "head_dropout", "fused_attention")


def add_finetune_options(p: argparse.ArgumentParser) -> list[str]:
    """The training options that make sense for fine-tuning, with the ``finetune`` recipe's defaults."""
    from .config import ViTConfig
    from .data import DataConfig
    from .optim import OptimConfig
    from .options import add_options
    from .recipes import recipe
    from .train import DERIVED_DATA_FIELDS, TrainConfig

    base = recipe("finetune")
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


# ---------------------------------------------------------------- bench

def cmd_bench(args: argparse.Namespace) -> int:
    """Time vitlab against timm and transformers, interleaved; print (and save) the markdown report."""
    from . import bench

    cases = bench.QUICK_CASES if args.quick else bench.FULL_CASES
    cases = tuple(c for c in cases if any(part in c.name for part in args.cases.split(",")))
    if not cases:
        raise ValueError(f"no benchmark case matches {args.cases!r}; see `vitlab bench --help`")
    rounds = args.rounds or (3 if args.quick else 5)
    report = bench.run(cases, rounds=rounds, target_s=0.3 if args.quick else 0.5, threads=args.threads,
                       compile=not (args.quick or args.no_compile), memory=not (args.quick or args.no_memory),
                       data=args.data, epoch_batches=args.epoch_batches, clock=args.clock,
                       log=lambda msg: print(msg, file=sys.stderr))
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitlab", description="The Vision Transformer, end to end.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list model presets with parameters and FLOPs")
    p.add_argument("filter", nargs="?", default="", help="only names containing this")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("inspect", help="attention maps, position-embedding similarity, attention distance, report")
    p.add_argument("checkpoint", help="model file or run directory")
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
    p.add_argument("--model", help="check the checkpoint against this preset's architecture")
    p.add_argument("--num-heads", type=int, help="heads (timm state dicts do not record them)")
    p.add_argument("--image-size", type=int, help="input size, when the checkpoint cannot tell it")
    p.add_argument("--mean", type=float, nargs=3, help="input normalisation mean (R G B)")
    p.add_argument("--std", type=float, nargs=3, help="input normalisation std (R G B)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="export a vitlab model to timm, Hugging Face, official .npz or ONNX")
    p.add_argument("checkpoint", help="vitlab model file or run directory")
    p.add_argument("dst", help=".safetensors/.pth (timm), a folder (Hugging Face), .npz (official; BiT's for a BiT "
                               "model) or .onnx")
    p.add_argument("--to", choices=["official", "big_vision", "bit", "timm", "hf"], help="force the format")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: any batch size")
    p.add_argument("--dynamic-size", action="store_true", help="ONNX: any image size (a multiple of the patch)")
    p.add_argument("--no-check", action="store_true", help="ONNX: skip the onnxruntime comparison")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("train", help="train a model from scratch (or --resume a run)", allow_abbrev=False,
                       description="Train from scratch. Every config field is an option; a recipe sets the "
                                   "starting values. Writes config.json, metrics.jsonl, curves.png, "
                                   "last/best.safetensors and state.pt into the run directory.")
    p.add_argument("--recipe", help="start from a named recipe (see --list-recipes)")
    p.add_argument("--out", metavar="RUN", help="run directory (default runs/<recipe>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN exactly")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes and their sources")
    p.set_defaults(func=cmd_train, config_options=add_train_options(p))

    p = sub.add_parser("eval", help="top-1/top-5/per-class accuracy and a confusion matrix", allow_abbrev=False)
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--data", help="data path (default: the run's data)")
    p.add_argument("--split", choices=["test", "val", "train"], help="default: test if the data has one, else val")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--flip-tta", action="store_true",
                   help="average the logits of each image and its mirror image (test-time augmentation)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k labels with probabilities for images", allow_abbrev=False)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a model file or run directory")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files or directories (-> CSV)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--output", metavar="CSV", help="write CSV here (a directory argument prints CSV by default)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("fewshot", help="few-shot linear evaluation of frozen features (the paper's ridge)",
                       allow_abbrev=False)
    p.add_argument("--from", dest="checkpoint", metavar="CHECKPOINT", required=True, help="model file or run directory")
    p.add_argument("--data", required=True, help="data with a train split and a test (or val) split")
    p.add_argument("--shots", default="1,5,10,25", help="examples per class, comma-separated (default 1,5,10,25)")
    p.add_argument("--seeds", type=int, default=3, help="random k-shot draws to average over (default 3)")
    p.add_argument("--feature", default="pre_logits", help="named intermediate, e.g. pre_logits, encoded, block_05")
    p.add_argument("--l2", type=float, default=1024.0, help="ridge regularisation (default 1024)")
    p.add_argument("--probe", choices=["logistic"], help="also fit a logistic-regression probe on the same shots")
    p.add_argument("--batch-size", type=int, default=256, help="images per feature-extraction batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=FEATURE_CACHE, help=f"extracted features are kept here ({FEATURE_CACHE})")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint on new classes at a new resolution (paper recipe)",
                       allow_abbrev=False,
                       description="Fine-tune as in the paper: new zero head, position embeddings resampled to "
                                   "the new grid, SGD momentum 0.9, warm-up + cosine, batch 512. Several --lr values "
                                   "are swept on a minival held out from train; the best is trained on all of train "
                                   "and evaluated on test. Writes RUN/lr_<lr>/, RUN/final/ and RUN/finetune.json.")
    p.add_argument("--from", dest="checkpoint", metavar="CHECKPOINT", required=True, help="model file or run directory")
    p.add_argument("--data", required=True, help="the new data (train and test splits)")
    p.add_argument("--image-size", type=int, help="fine-tuning resolution (default: the checkpoint's)")
    p.add_argument("--out", metavar="RUN", help="output directory (default runs/finetune-<time>)")
    p.add_argument("--lr", default=",".join(map(str, LR_SWEEP)),
                   help="learning rate, or comma-separated values to sweep (default: the paper's %(default)s)")
    p.add_argument("--minival", type=float, default=MINIVAL, help="share of train that chooses the lr (%(default)s)")
    p.add_argument("--freeze", choices=["backbone"], help="train the head only (a linear probe by gradient descent)")
    p.add_argument("--train-blocks", type=int, metavar="K",
                   help="train only the last K blocks, the final norm and the head")
    p.add_argument("--keep-pre-logits", action="store_true", help="keep the pre-trained representation layer")
    p.add_argument("--posemb-mode", choices=["scipy", "bilinear", "bicubic"], default="scipy",
                   help="position-embedding resampling (default scipy: the official corner-aligned linear zoom)")
    p.set_defaults(func=cmd_finetune, config_options=add_finetune_options(p))

    p = sub.add_parser("bench", help="speed against timm and transformers (needs vitlab[bench])")
    p.add_argument("--quick", action="store_true", help="3 small cases, 3 rounds, no compile or memory (~1 min)")
    p.add_argument("--cases", default="", help="only cases whose name contains one of these comma-separated parts, e.g. 'vit_s16,train'")
    p.add_argument("--rounds", type=int, default=0, help="timing rounds (default 5, quick 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every variant")
    p.add_argument("--no-compile", action="store_true", help="leave out timm + torch.compile")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: thread CPU time, robust on a shared machine (needs --threads 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    p.add_argument("--data", help="CIFAR-10 folder: also time an end-to-end training epoch on it")
    p.add_argument("--epoch-batches", type=int, default=0, help="stop the epoch after this many batches (0: all)")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"vitlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:  # SIGINT / SIGTERM during training: a checkpoint was saved first
        print0(f"vitlab {args.command}: {err}", file=sys.stderr)
        return 128 + err.signum
    except TrainingDiverged as err:  # NaN / inf: the last good checkpoint is kept
        print0(f"vitlab {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the loop started, or a second Ctrl-C
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
