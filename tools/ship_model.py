"""Package a finished `cifar10` run as vitlab's own model: bf16 safetensors, a model card, a catalog entry.

    python tools/ship_model.py runs/cifar10-50ep-seed0 --data ../shared/data/cifar-10-batches-bin

Writes ``src/vitlab/hub/models/<name>.safetensors`` (bf16 weights, the run's config, CIFAR-10
class names, preprocessing), measures that file's test top-1 with ``vitlab eval`` (plain and flip
TTA, fp32 compute), and writes the card ``<name>.md`` and the catalog entry (sha256, size, accuracy).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "vit_conv_32px.vitlab_cifar10"
# The run that made the shipped file (the data path is the machine's copy of CIFAR-10).
COMMAND = ("vitlab train --recipe cifar10 --data ../shared/data/cifar-10-batches-bin --epochs 50 --seed 0 "
           "--eval-every 1000000 --checkpoint-every 1000 --out runs/cifar10-50ep-seed0")
PACKAGE = ROOT / "src" / "vitlab" / "hub"


def dump_catalog(catalog: dict) -> str:
    """catalog.json in its own style: one line per field of an entry, nested values on that line."""
    out = ["{"]
    tops = list(catalog.items())
    for i, (key, value) in enumerate(tops):
        comma = "," if i < len(tops) - 1 else ""
        if key == "models":
            out.append('  "models": {')
            for j, (name, entry) in enumerate(value.items()):
                out.append(f"    {json.dumps(name)}: {{")
                fields = [f"      {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in entry.items()]
                out.append(",\n".join(fields))
                out.append("    }" + ("," if j < len(value) - 1 else ""))
            out.append("  }" + comma)
        else:
            text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n  ")
            out.append(f"  {json.dumps(key)}: {text}{comma}")
    return "\n".join(out) + "\n}\n"


def vitlab_eval(model: str, data: str, *flags: str) -> dict:
    """`vitlab eval --json` of the packaged model, as a user would run it."""
    cmd = [sys.executable, "-m", "vitlab", "eval", "--model", model, "--data", data, "--split", "test", "--json", *flags]
    print("$ vitlab " + " ".join(cmd[3:]), flush=True)
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished `vitlab train --recipe cifar10` run directory")
    p.add_argument("--data", required=True, help="the CIFAR-10 folder (for the test-set measurement)")
    args = p.parse_args()

    import torch

    from vitlab.checkpoint import load_model, save_model
    from vitlab.hub.cache import sha256_file

    run_cfg = json.loads((args.run / "config.json").read_text())
    records = [json.loads(ln) for ln in (args.run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    final = [r for r in records if "eval_top1" in r][-1]
    loaded = load_model(args.run / "last.safetensors")
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in loaded.model.state_dict().items()}
    dest = PACKAGE / "models" / f"{NAME}.safetensors"
    cfg = loaded.config
    meta = {"model": "vit_conv_32px", "pretrained": NAME, "recipe": "cifar10", "run_config": run_cfg,
            "preprocess": {"image_size": 32, "crop_pct": 1.0, "interpolation": "bilinear", "resize": "shorter",
                           "mean": list(cfg.mean), "std": list(cfg.std)}}
    save_model(loaded.model, dest, class_names=loaded.class_names, meta=meta, state_dict=bf16)
    print(f"wrote {dest} ({dest.stat().st_size:,} bytes)")

    catalog_file = PACKAGE / "catalog.json"
    catalog = json.loads(catalog_file.read_text())
    entry = {"architecture": "vit_conv_32px", "source": {"package": dest.name}, "format": "vitlab",
             "image_size": 32, "num_classes": 10, "labels": "cifar10",
             "preprocess": {k: v for k, v in meta["preprocess"].items() if k != "image_size"},
             "license": "Apache-2.0", "size": dest.stat().st_size, "sha256": sha256_file(dest), "accuracy": None,
             "description": f"vitlab's own: the cifar10 recipe for {run_cfg['train']['epochs']:g} epochs from "
                            f"scratch on CIFAR-10's 50,000 training images at 32 px (2 CPU cores), bf16 weights"}
    catalog["models"][NAME] = entry
    catalog.setdefault("defaults", {})["vit_conv_32px"] = NAME.split(".", 1)[1]
    catalog_file.write_text(dump_catalog(catalog))
    plain = vitlab_eval(NAME, args.data)
    tta = vitlab_eval(NAME, args.data, "--flip-tta")
    entry["accuracy"] = {"top1": round(100 * plain["top1"], 2), "top5": round(100 * plain["top5"], 2),
                         "flip_tta_top1": round(100 * tta["top1"], 2), "data": "cifar10", "split": "test",
                         "source": f"vitlab eval --model {NAME} --data CIFAR10 --split test [--flip-tta] "
                                   f"(10,000 test images, fp32 compute of the bf16 weights)"}
    catalog_file.write_text(dump_catalog(catalog))

    card = PACKAGE / "models" / f"{NAME}.md"
    train = run_cfg["train"]
    card.write_text(f"""# {NAME}

vitlab's own CIFAR-10 model, shipped in the package so that predict, inspect, eval and fine-tuning
work offline on a real model: `vitlab.create_model("{NAME}", pretrained=True)`.

- **Architecture**: `vit_conv_32px`: a 3-conv stem (96, 192, 192 channels; two stride-2 convs and one
  stride-1) cuts the 32 x 32 image into an 8 x 8 grid of tokens; ViT width 192, depth 6, MLP 384,
  3 heads, global average pooling, no class token; {sum(p.numel() for p in loaded.model.parameters()):,} parameters.
- **Data**: CIFAR-10's 50,000 training images (the copy in `../shared/data`, whose pixels went
  through JPEG once), no validation split held out; pad-crop + flip, label smoothing 0.1.
- **Recipe**: `cifar10` (`vitlab train --recipe cifar10 --list-recipes` has its source) for
  {train['epochs']:g} epochs ({train['steps']:,} steps of {train['batch_size']}), AdamW lr {run_cfg['train']['optim']['lr']:g},
  cosine, progressive resizing 16 -> 32 px, bf16 autocast, seed {train['seed']}.
- **Command**: `{COMMAND}`
- **Test top-1** (CIFAR-10 test split, 10,000 images, measured on this bf16 file by `vitlab eval`):
  **{entry['accuracy']['top1']:.2f}%** without test-time augmentation, **{entry['accuracy']['flip_tta_top1']:.2f}%**
  with flip TTA (`--flip-tta`); top-5 {entry['accuracy']['top5']:.2f}%. The run itself printed
  {100 * final['eval_top1']:.2f}% ({final['eval_split']} split, flip TTA {'on' if train.get('flip_tta') else 'off'}, its fp32
  weights under bf16 autocast), which `vitlab eval RUN --flip-tta --precision bf16` reproduces.
- **Reproduce**: the command above, then `python tools/ship_model.py RUN --data CIFAR10`.
- **License**: Apache-2.0 (the weights); CIFAR-10 is from Krizhevsky (2009).
""")
    print(f"wrote {card}")
    print(json.dumps(entry["accuracy"], indent=2))


if __name__ == "__main__":
    main()
