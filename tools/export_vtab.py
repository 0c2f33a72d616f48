"""Export the 19 VTAB-1k tasks into the folders `vitlab vtab --tasks DIR` reads (run on a connected machine).

The tasks, their splits and their labels (CLEVR's object count, dSprites' binned position, KITTI's
distance bins, ...) are google-research/task_adaptation's, over tensorflow_datasets; the task list is
``src/vitlab/vtab_tasks.json``. VTAB-1k's splits: train800 is the first 800 images of the task's "train"
split, val200 the first 200 of its "val" split (both in TFDS order), test its "test" split. Writes::

    DIR/TASK/train800/<label>/<n>.png   DIR/TASK/val200/<label>/<n>.png   DIR/TASK/test/<label>/<n>.png
    DIR/TASK/classes.txt                every label (a split may lack some: SUN397's 1,000 training images do)

Labels are zero-padded class indices, so folder order is label order. Needs (not vitlab's dependencies)::

    pip install tensorflow tensorflow-datasets pillow git+https://github.com/google-research/task_adaptation
    python tools/export_vtab.py --out vtab/ [--data-dir ~/tensorflow_datasets] [--only dtd,eurosat]

TFDS downloads each source once into --data-dir; a few need a manual download first, as TFDS says
(diabetic_retinopathy_detection, and the dmlab / sun397 / kitti archives are large). A finished task
(its classes.txt written last) is skipped when the script runs again. This script is not run by the
tests (no TensorFlow there); vitlab reads its output like any image folder.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TASKS = Path(__file__).resolve().parent.parent / "src" / "vitlab" / "vtab_tasks.json"
SPLITS = (("train800", "train", 800), ("val200", "val", 200), ("test", "test", None))


def export_task(name: str, registry_name: str, out: Path, data_dir: str | None) -> None:
    """One task: its three splits as PNGs in label folders, then ``classes.txt``."""
    import numpy as np
    import tensorflow_datasets as tfds
    from PIL import Image
    import task_adaptation.data_loader  # noqa: F401  (registers every task's data class)
    from task_adaptation.registry import Registry

    data = Registry.lookup(f"data.{registry_name}", kwargs_extra={"data_dir": data_dir})
    num_classes = data.get_num_classes()
    width = len(str(num_classes - 1))
    task = out / name
    if task.exists():
        shutil.rmtree(task)  # an interrupted export starts over
    for folder, split, count in SPLITS:
        ds = data.get_tf_data(split, batch_size=1, epochs=1, for_eval=True, drop_remainder=False, prefetch=0)
        if count:
            ds = ds.take(count)
        n = 0
        for n, example in enumerate(tfds.as_numpy(ds), 1):
            image, label = np.asarray(example["image"][0]), int(example["label"][0])
            target = task / folder / f"{label:0{width}d}"
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.astype(np.uint8).squeeze()).save(target / f"{n:06d}.png")
        print(f"{name}: {folder}: {n} images")
    (task / "classes.txt").write_text("".join(f"{c:0{width}d}\n" for c in range(num_classes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="the tasks folder to write (vitlab vtab --tasks)")
    parser.add_argument("--data-dir", help="tensorflow_datasets' data folder (default: its own)")
    parser.add_argument("--only", help="comma-separated task names (default: all 19)")
    args = parser.parse_args()
    tasks = json.loads(TASKS.read_text())["tasks"]
    names = args.only.split(",") if args.only else list(tasks)
    unknown = [n for n in names if n not in tasks]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; the tasks are {', '.join(tasks)}")
    out = Path(args.out)
    for name in names:
        if (out / name / "classes.txt").is_file():
            print(f"{name}: exported earlier; skipped")
            continue
        export_task(name, tasks[name]["task_adaptation"], out, args.data_dir)


if __name__ == "__main__":
    main()
