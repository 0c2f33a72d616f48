"""VTAB-1k (`vitlab vtab`): task folders, the 800 / 200 sweep then 1,000 and test, group means, resume, bad input."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli import main
from vitlab.data import DataConfig, build_data
from vitlab.vtab import TASKS_FILE, find_tasks, task_specs

TINY = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
# 2 steps of 8 images, a 2-value sweep: each task is three training runs of a 0.01M-parameter ViT
FAST = ["--lr", "0.01,0.03", "--steps", "2", "--batch-size", "8", "--accum-steps", "1", "--warmup-steps", "1",
        "--threads", "1", "--precision", "fp32", "--eval-batch-size", "64"]


def write_images(folder: Path, n: int, colour: int, seed: int = 0) -> None:
    """``n`` small PNGs whose one channel is bright, so a class is a colour."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 40, (12, 12, 3), dtype=np.uint8)
        pixels[..., colour] += 150
        Image.fromarray(pixels).save(folder / f"{seed:02d}_{i:03d}.png")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """dtd: the plain layout (20 training images: 16 + 4); eurosat: train800/ + val200/; toy: no VTAB
    task, and its test split has a class its training images lack (as SUN397's 1,000 images do)."""
    root = tmp_path_factory.mktemp("vtab")
    for c, name in enumerate(("red", "green")):
        write_images(root / "dtd" / "train" / name, 10, c, seed=c)
        write_images(root / "dtd" / "test" / name, 5, c, seed=10 + c)
        write_images(root / "eurosat" / "train800" / name, 8, c, seed=20 + c)
        write_images(root / "eurosat" / "val200" / name, 2, c, seed=30 + c)
        write_images(root / "eurosat" / "test" / name, 4, c, seed=40 + c)
        write_images(root / "toy" / "train" / name, 10, c, seed=50 + c)
    write_images(root / "toy" / "test" / "red", 3, 0, seed=60)
    write_images(root / "toy" / "test" / "blue", 3, 2, seed=61)
    return root


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitlab.create_model("vit_mu4_32px", **TINY)
    return vitlab.save_model(model, tmp_path_factory.mktemp("pre") / "pre.safetensors",
                             class_names=[f"c{i}" for i in range(10)])


def test_the_task_file_holds_the_19_tasks_in_their_groups():
    tasks = json.loads(TASKS_FILE.read_text())["tasks"]
    groups = {g: sorted(n for n, t in tasks.items() if t["group"] == g) for g in ("natural", "specialized", "structured")}
    assert groups["natural"] == ["caltech101", "cifar100", "dtd", "oxford_flowers102", "oxford_iiit_pet", "sun397", "svhn"]
    assert groups["specialized"] == ["diabetic_retinopathy", "eurosat", "patch_camelyon", "resisc45"]
    assert groups["structured"] == ["clevr_count", "clevr_distance", "dmlab", "dsprites_location",
                                    "dsprites_orientation", "kitti_distance", "smallnorb_azimuth", "smallnorb_elevation"]
    specs = task_specs()
    assert specs["cifar"].name == "cifar100" and specs["dsprites_ori"].name == "dsprites_orientation"
    assert not specs["dsprites_orientation"].flip and not specs["dsprites_location"].crop  # labels they would change


def test_the_800_200_split_is_deterministic_and_disjoint(tasks):
    first, again = find_tasks(tasks, log=lambda m: None), find_tasks(tasks, log=lambda m: None)
    dtd = first[0]
    assert dtd.name == "dtd" and dtd.group == "natural"
    train = {p for paths in dtd.train.values() for p in paths}
    val = {p for paths in dtd.val.values() for p in paths}
    assert (len(train), len(val)) == (16, 4) and not train & val  # 80 / 20, as 800 / 200
    assert train | val == {str(p) for p in (tasks / "dtd" / "train").rglob("*.png")}
    assert again[0].train == dtd.train and again[0].val == dtd.val
    toy = first[2]
    assert toy.classes == ["blue", "green", "red"] and toy.group == "other"


def test_vtab_end_to_end_then_resume(tasks, model_file, tmp_path, capsys):
    out = tmp_path / "vtab"
    command = ["vtab", "--model", str(model_file), "--tasks", str(tasks), "--out", str(out), *FAST]
    assert main(command) == 0
    captured = capsys.readouterr()
    assert "toy is not one of VTAB-1k's 19 tasks" in captured.err + captured.out
    assert "natural mean" in captured.out and "not all 19 tasks" in captured.out

    summary = json.loads((out / "vtab.json").read_text())
    assert list(summary["tasks"]) == ["dtd", "eurosat", "toy"] and summary["pending"] == []
    for name, t in summary["tasks"].items():
        assert 0 <= t["test_top1"] <= 1 and t["lr"] in (0.01, 0.03)
        assert set(t["val200_top1"]) == {"0.01", "0.03"}  # each lr scored on the 200 (here 4 or 20%)
    dtd, eurosat, toy = (summary["tasks"][n] for n in ("dtd", "eurosat", "toy"))
    assert (dtd["num_train"], dtd["num_val"], dtd["num_test"]) == (20, 4, 10)
    assert (eurosat["num_train"], eurosat["num_val"]) == (20, 4) and toy["num_classes"] == 3
    groups = summary["groups"]
    assert groups["natural"] == {"mean": dtd["test_top1"], "tasks": ["dtd"]}
    assert groups["specialized"]["mean"] == eurosat["test_top1"] and groups["other"]["tasks"] == ["toy"]
    assert summary["mean"] == pytest.approx((dtd["test_top1"] + eurosat["test_top1"] + toy["test_top1"]) / 3)
    assert summary["complete"] is False and summary["num_tasks"] == 3
    assert (out / "vtab.png").read_bytes()[:4] == b"\x89PNG"

    # the sweep trained on the 800 and scored on the 200; the final run trained on all 1,000 and tested
    sweep_cfg = json.loads((out / "dtd" / "lr_0.01" / "config.json").read_text())
    final_cfg = json.loads((out / "dtd" / "final" / "config.json").read_text())
    assert sweep_cfg["train"]["data"]["path"].endswith("dtd/data/sweep") and sweep_cfg["train"]["data"]["val_split"] == 0
    assert final_cfg["train"]["data"]["path"].endswith("dtd/data/all") and final_cfg["train"]["steps"] == 2
    assert final_cfg["train"]["data"]["crop"] == "rrc" and final_cfg["train"]["eval_every"] == 2
    assert final_cfg["class_names"] == ["green", "red"]
    assert json.loads((out / "toy" / "final" / "config.json").read_text())["class_names"] == ["blue", "green", "red"]
    data = build_data(DataConfig(path=sweep_cfg["train"]["data"]["path"]), log=lambda m: None)
    assert (len(data.train), len(data.val)) == (16, 4)

    # a second call skips every finished task
    stamp = (out / "dtd" / "final" / "last.safetensors").stat().st_mtime_ns
    assert main(command) == 0
    captured = capsys.readouterr()
    assert captured.err.count("finished earlier") + captured.out.count("finished earlier") == 3
    assert (out / "dtd" / "final" / "last.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / "vtab.json").read_text())["tasks"] == summary["tasks"]

    # a task killed before it finished (no result file, a half-written run) starts over; the others stay
    (out / "toy" / "result.json").unlink()
    (out / "toy" / "finetune.json").unlink()
    (out / "toy" / "final" / "state.pt").unlink()
    assert main(command) == 0
    captured = capsys.readouterr()
    assert "toy: an unfinished attempt" in captured.err + captured.out
    assert captured.err.count("finished earlier") + captured.out.count("finished earlier") == 2
    assert json.loads((out / "vtab.json").read_text())["tasks"].keys() == summary["tasks"].keys()
    assert (out / "toy" / "final" / "state.pt").is_file()
    assert (out / "dtd" / "final" / "last.safetensors").stat().st_mtime_ns == stamp

    # other settings on the same --out are refused, before anything runs
    assert main([*command, "--steps", "3"]) == 2
    assert "other settings (--steps differ)" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(tasks, model_file, tmp_path, capsys):
    def refused(*argv: str) -> str:
        assert main(["vtab", "--model", str(model_file), "--out", str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("vitlab vtab: error: ")
        return err

    assert "tasks folder" in refused("--tasks", str(tmp_path / "missing")) and "does not exist" in refused(
        "--tasks", str(tmp_path / "missing"))
    no_test = tmp_path / "no_test"
    write_images(no_test / "dtd" / "train" / "red", 2, 0)
    assert "has no test split" in refused("--tasks", str(no_test))
    half = tmp_path / "half"
    write_images(half / "eurosat" / "train800" / "red", 2, 0)
    write_images(half / "eurosat" / "test" / "red", 2, 0)
    assert "only one of train800/ and val200/" in refused("--tasks", str(half))
    assert "names task(s) ['nope']" in refused("--tasks", str(tasks), "--only", "nope")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    err = refused("--tasks", str(tasks), "--out", str(foreign))
    assert "holds no VTAB sweep" in err and (foreign / "notes.txt").read_text() == "mine"
    assert "is inside --tasks" in refused("--tasks", str(tasks), "--out", str(tasks / "runs"))
    assert not (tmp_path / "out").exists() and not (tasks / "runs").exists()


def test_one_process_per_out_and_an_interrupted_task(tasks, model_file, tmp_path, capsys, monkeypatch):
    import signal

    import vitlab.vtab as vtab_module
    from vitlab.errors import Interrupted
    from vitlab.run import RunLock

    out = tmp_path / "out"
    command = ["vtab", "--model", str(model_file), "--tasks", str(tasks), "--out", str(out), "--only", "dtd", *FAST]
    with RunLock(out):  # as a running `vitlab vtab` holds it
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"in use by process {os.getpid()}" in err and "vitlab vtab --model" in err

    def stopped(cfg, work, lrs, **kw):
        raise Interrupted(signal.SIGINT, 1, work / "lr_0.01")

    monkeypatch.setattr(vtab_module, "finetune", stopped)
    assert main(command) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "stopped by SIGINT at step 1; dtd is unfinished; continue with the same command" in err
    assert not (out / "dtd" / "result.json").exists() and (out / "vtab_config.json").is_file()


def test_classes_txt_lets_a_split_lack_a_class(tmp_path):
    root = tmp_path / "data"
    write_images(root / "train" / "a", 3, 0)
    write_images(root / "train" / "b", 3, 1)
    write_images(root / "test" / "c", 2, 2)
    with pytest.raises(ValueError, match="or list the classes in .*classes.txt"):
        build_data(DataConfig(path=str(root)), log=lambda m: None)
    (root / "classes.txt").write_text("a\nb\nc\n")
    data = build_data(DataConfig(path=str(root), val_split=0.34), log=lambda m: None)
    assert data.class_names == ["a", "b", "c"] and set(data.test.labels.tolist()) == {2}
    assert len(data.val) == 2 and len(data.train) == 4  # the stratified split passes over the empty class
    (root / "classes.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"that .*classes.txt does not list"):
        build_data(DataConfig(path=str(root)), log=lambda m: None)


def test_the_task_file_ships_with_the_package():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "vtab_tasks.json" in package_data["vitlab"] and TASKS_FILE.parent == root / "src" / "vitlab"
    assert "include src/vitlab/vtab_tasks.json" in (root / "MANIFEST.in").read_text()
