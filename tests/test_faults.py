"""Hostile cases (issue 23): each reproduces a failure that lost or corrupted a run, then shows it fixed."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import vitlab.train as train_module
from helpers import tiny_cfg
from vitlab.cli import main
from vitlab.run import RunLock
from vitlab.errors import TrainingDiverged
from vitlab.train import train
from vitlab.trainconfig import TrainConfig

def tiny(data: Path, **kw) -> TrainConfig:
    return tiny_cfg(data, **{"steps": 4, "eval_every": 2, "checkpoint_every": 2, **kw})


def quiet(msg: str) -> None:
    pass


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_resume_without_state_refuses_and_keeps_history(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(cifar), run, log=quiet)
    (run / "state.pt").unlink()
    before, best = lines(run / "metrics.jsonl"), (run / "best.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no state.pt" in err and "metrics.jsonl (" in err and err.count("\n") == 1
    assert lines(run / "metrics.jsonl") == before and (run / "best.safetensors").read_bytes() == best


def test_a_locked_run_directory_refuses_a_second_process(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(cifar), run, log=quiet)
    capsys.readouterr()
    with RunLock(run):  # as a running `vitlab train` holds it
        assert main(["train", "--resume", str(run)]) == 2
        assert f"is in use by process {os.getpid()}" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    with RunLock(fresh):
        with pytest.raises(ValueError, match=f"in use by process {os.getpid()}"):
            train(tiny(cifar), fresh, log=quiet)
    assert not (fresh / "config.json").exists()


def test_a_foreign_folder_is_never_written_into(cifar, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    (foreign / "best.safetensors").write_bytes(b"someone else's")
    args = ["train", "--model", "vit_mu4_32px", "--width", "32", "--depth", "1", "--mlp-dim", "64",
            "--num-heads", "2", "--data", str(cifar), "--steps", "2", "--out", str(foreign)]
    assert main(args) == 2
    assert "is not empty and is not a vitlab run" in capsys.readouterr().err
    assert (foreign / "metrics.jsonl").read_text() == '{"loss": 1.0}\n'
    assert (foreign / "best.safetensors").read_bytes() == b"someone else's"
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert main([*args[:-1], str(afile)]) == 2 and "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--lr", "inf"], ["--lr", "nan"], ["--weight-decay", "-0.1"],
                                    ["--label-smoothing", "nan"], ["--mixup", "-1"], ["--drop-path", "inf"]])
def test_non_finite_and_negative_numbers_are_refused(cifar, tmp_path, capsys, option):
    assert main(["train", "--recipe", "demo", "--data", str(cifar), "--out", str(tmp_path / "r"), *option]) == 2
    err = capsys.readouterr().err
    assert option[0].lstrip("-").replace("-", "_") in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_weights_that_are_not_finite_are_never_checkpointed(cifar, tmp_path, monkeypatch):
    real = train_module.TrainState.state_dict

    def poisoned(self, *args):
        state = real(self, *args)
        next(iter(state["model"].values())).fill_(float("inf"))
        return state

    monkeypatch.setattr(train_module.TrainState, "state_dict", poisoned)
    with pytest.raises(TrainingDiverged, match="not finite.*last good checkpoint"):
        train(tiny(cifar, steps=2), tmp_path / "run2", log=quiet)
    assert not (tmp_path / "run2" / "last.safetensors").exists() and not (tmp_path / "run2" / "state.pt").exists()


def test_last_checkpoint_records_its_own_step(cifar, tmp_path, monkeypatch):
    seen = []
    real = train_module.save_checkpoint

    def spy(run, state, *args, meta, **kw):
        seen.append((state.step, meta["step"]))
        return real(run, state, *args, meta=meta, **kw)

    monkeypatch.setattr(train_module, "save_checkpoint", spy)
    train(tiny(cifar, steps=3, eval_every=2, checkpoint_every=1), tmp_path / "run", log=quiet)
    assert seen == [(1, 1), (2, 2), (3, 3)]


def test_model_files_are_0644_and_killed_writes_are_cleaned(cifar, tmp_path):
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train(tiny(cifar, steps=2), run, log=quiet)
    finally:
        os.umask(old)
    for name in ("last.safetensors", "best.safetensors", "state.pt", "config.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    leftovers = [run / ".state.pt.k1ll3d.tmp", run / ".tmpa1b2c3", run / ".last.safetensors.x.tmp"]
    for f in leftovers:
        f.write_bytes(b"partial")
    train_module.resume(run, log=quiet)  # the run is complete: it only takes the lock and cleans up
    assert not any(f.exists() for f in leftovers)
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("vitlab 0.")


def test_a_one_class_folder_is_refused(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "data" / "cat").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "data" / "cat" / f"{i}.png")
    assert main(["train", "--recipe", "demo", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r")]) == 2
    assert "a classifier needs at least two class folders" in capsys.readouterr().err


def test_eval_never_scores_the_train_split_silently(cifar, tmp_path, capsys):
    from PIL import Image

    for c in map(str, range(10)):  # the classes of the tiny CIFAR the model is trained on
        (tmp_path / "only_train" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(tmp_path / "only_train" / c / f"{i}.png")
    run = tmp_path / "run"
    train(tiny(cifar, steps=2), run, log=quiet)
    vitlab_file = run / "last.safetensors"
    capsys.readouterr()
    assert main(["eval", str(vitlab_file), "--data", str(tmp_path / "only_train")]) == 2
    assert "no test or val split; pass --split train" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_a_missing_extra_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kw):
        if name.split(".")[0] in ("onnx", "onnxruntime", "onnxscript"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kw)

    import vitlab
    model_file = tmp_path / "m.safetensors"
    vitlab.save_model(vitlab.create_model("vit_mu4_32px", width=32, depth=1, mlp_dim=64, num_heads=2), model_file)
    monkeypatch.setattr(builtins, "__import__", no_onnx)
    assert main(["export", str(model_file), str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'vitlab[onnx]'" in err and err.count("\n") == 1


def test_symlink_loops_are_followed_once_and_never_mislabel(tmp_path):
    from PIL import Image

    from vitlab.data import DataConfig, build_data

    root = tmp_path / "data"
    for c in ("cat", "dog"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(24):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / "train" / c / f"{i}.png")
    (root / "train" / "cat" / "loop").symlink_to("..")       # back up the tree: the dog images, as cats
    (root / "train" / "cat" / "self").symlink_to(".")        # itself, again and again
    (root / "train" / "dog" / "self2").symlink_to("../dog")
    (root / "train" / "cat" / "dogs").symlink_to("../dog")   # into another class
    messages = []
    data = build_data(DataConfig(path=str(root)), log=messages.append)
    assert len(data.train) == 48
    labels = data.train.labels.tolist()
    assert labels.count(0) == 24 and labels.count(1) == 24
    assert any("did not follow 4 link(s)" in m for m in messages)


def test_resume_on_changed_data_is_refused_unless_allowed(cifar, tmp_path, capsys):
    import shutil

    data = tmp_path / "cifar-10-batches-bin"
    shutil.copytree(cifar, data)
    run = tmp_path / "run"
    train(tiny(data, steps=2), run, log=quiet)
    batch = data / "data_batch_1.bin"
    swapped = bytearray(batch.read_bytes())
    swapped[1:100] = bytes(99)  # same size, other pixels
    batch.write_bytes(bytes(swapped))
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert "the training data changed" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--allow-data-change"]) == 0


def test_a_small_file_declaring_a_giant_model_allocates_nothing(tmp_path):
    from safetensors.torch import save_file

    import vitlab
    from vitlab.config import to_dict
    from vitlab.models import model_config

    small = vitlab.create_model("vit_mu4_32px", width=32, depth=1, mlp_dim=64, num_heads=2)
    giant = to_dict(model_config("vit_h14", num_classes=21843))
    path = tmp_path / "hostile.safetensors"
    tensors = {k: v.contiguous() for k, v in small.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "vitlab", "config_type": "ViTConfig",
                                            "config": json.dumps(giant), "class_names": "null", "meta": "{}"})
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="does not fit this model"):
        vitlab.load_model(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no 2.5 GB model built


@pytest.mark.parametrize("drop, changes, field", [
    ("config_type", {}, "no 'config_type'"),
    ("", {"config": "{not json"}, "'config' is not valid JSON"),
    ("", {"config": '{"width": "abc"}'}, "'config' does not describe a model"),
    ("", {"config_type": "NoSuchConfig"}, "'config' does not describe a model"),
    ("", {"class_names": '["just one"]'}, "'class_names' must list 10 names"),
])
def test_hostile_model_metadata_gets_one_line_errors(tmp_path, drop, changes, field):
    from safetensors.torch import save_file

    import vitlab
    from vitlab.config import to_dict

    model = vitlab.create_model("vit_mu4_32px", width=32, depth=1, mlp_dim=64, num_heads=2)
    metadata = {"format": "vitlab", "config_type": "ViTConfig", "config": json.dumps(to_dict(model.cfg)), **changes}
    metadata.pop(drop, None)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=field) as err:
        vitlab.load_model(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_hf_index_shard_outside_the_folder_is_refused(tmp_path):
    import vitlab
    from vitlab.interop import export_model, import_model

    folder = tmp_path / "hf"
    export_model(vitlab.create_model("vit_mu4_32px", width=32, depth=1, mlp_dim=64, num_heads=2), folder)
    outside = tmp_path / "outside.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../outside.safetensors"}}))
    with pytest.raises(ValueError, match="outside"):
        import_model(folder)


def test_eval_of_a_read_only_run_prints_its_metrics(cifar, tmp_path, capsys, monkeypatch):
    import errno

    import vitlab.plots

    run = tmp_path / "run"
    train(tiny(cifar, steps=2), run, log=quiet)
    capsys.readouterr()

    def read_only(confusion, names, path, **kw):  # what a read-only mount does to the PNG (root can write anywhere)
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(vitlab.plots, "plot_confusion", read_only)
    assert main(["eval", str(run), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_images"] == 20 and "Read-only file system" in captured.err
    (run / "sub").mkdir()
    assert main(["train", "--resume", str(run / "last.safetensors")]) == 2  # a file, not a run: one line


def test_non_utf8_file_names_are_escaped_not_fatal(cifar, tmp_path, capsys):
    from PIL import Image

    run = tmp_path / "run"
    train(tiny(cifar, steps=2), run, log=quiet)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "ok.png")
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    Image.new("RGB", (32, 32)).save(images / name)
    (images / os.fsdecode(b"bad\xff.png")).write_bytes(b"not an image")
    capsys.readouterr()
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(images), "--output", str(out)]) == 0
    rows = out.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and any("caf\\udce9.png" in r for r in rows)


def test_images_over_the_pixel_cap_are_skipped_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from vitlab.data import load_image

    big = tmp_path / "big.png"
    Image.new("RGB", (120, 100)).save(big)
    monkeypatch.setenv("VITLAB_MAX_PIXELS", "10000")
    with pytest.raises(ValueError, match="120 x 100 pixels is over the cap of 10,000"):
        load_image(big)
    monkeypatch.setenv("VITLAB_MAX_PIXELS", "12000")
    assert load_image(big).size == (120, 100)


def test_the_sdist_has_what_the_tests_and_the_package_need(tmp_path, monkeypatch):
    import tarfile

    from setuptools import build_meta

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    name = build_meta.build_sdist(str(tmp_path))
    with tarfile.open(tmp_path / name) as tar:
        files = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("LICENSE", "tests/helpers.py", "tests/dist_worker.py", "tests/conftest.py",
                   "src/vitlab/hub/catalog.json", "src/vitlab/hub/labels/imagenet21k.txt"):
        assert needed in files, needed


def test_resume_is_exact_when_a_whole_batch_is_unreadable(tmp_path, monkeypatch):
    import signal

    from PIL import Image

    from vitlab.errors import Interrupted

    root = tmp_path / "data"
    for c in range(2):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), (40 * i, 100 * c, 0)).save(root / "train" / f"c{c}" / f"{i}.png")
        (root / "train" / f"c{c}" / "broken.png").write_bytes(b"not an image")
    cfg = tiny(root, batch_size=1, steps=20, eval_every=100, checkpoint_every=3)  # batch 1: a broken file is a batch
    straight = train(cfg, tmp_path / "straight", log=quiet)
    skipped = [r for r in train_module.read_metrics(tmp_path / "straight" / "metrics.jsonl") if "skipped" in r]
    assert straight.step == 20 and skipped  # the broken files fell in this run's 20 steps

    real = train_module.lr_at
    def interrupt_at_step_8(step, **kw):
        if step == 7:
            signal.raise_signal(signal.SIGINT)  # saves a checkpoint after this step, then stops
        return real(step, **kw)
    monkeypatch.setattr(train_module, "lr_at", interrupt_at_step_8)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "cut", log=quiet)
    monkeypatch.setattr(train_module, "lr_at", real)
    train_module.resume(tmp_path / "cut", log=quiet)
    a = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_is_one_line(cifar, tmp_path, capsys, monkeypatch, signum):
    import signal

    import vitlab.train as t

    def interrupted_loading(*args, **kw):
        signal.raise_signal(getattr(signal, signum))

    monkeypatch.setattr(t, "build_data", interrupted_loading)
    before = signal.getsignal(signal.SIGTERM)
    rc = main(["train", "--recipe", "demo", "--data", str(cifar), "--out", str(tmp_path / "r")])
    assert signal.getsignal(signal.SIGTERM) == before  # main puts the handler back
    assert rc == 128 + getattr(signal, signum)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, expect", [
    (["trian"], "did you mean train?"),
    (["eval", "run", "--flip"], "--flip -> --flip-tta"),
    (["train", "--learning-rat", "1"], "unrecognized arguments: --learning-rat 1"),
])
def test_a_misspelt_verb_or_option_names_the_nearest(argv, expect, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expect in err
    if argv[0] != "trian":  # the verb's own usage, not the top-level one
        assert f"usage: vitlab {argv[0]}" in err and f"see `vitlab {argv[0]} --help`" in err


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_verb_imports_is_one_line(capsys, monkeypatch, signum):
    import signal

    import vitlab.cli as cli

    def interrupted_import(*args, **kw):  # building train's options imports torch: seconds on these machines
        signal.raise_signal(getattr(signal, signum))

    monkeypatch.setattr(cli, "add_train_options", interrupted_import)
    assert main(["train", "--help"]) == 128 + getattr(signal, signum)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vitlab train: interrupted" in err and "Traceback" not in err


def test_a_full_disk_is_one_line_naming_the_model_file(cifar, tmp_path, capsys, monkeypatch):
    import errno

    from safetensors import SafetensorError

    import vitlab.checkpoint as ckpt
    import vitlab.train as t

    def full(*args, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full_png(records, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "save_file", full)
    monkeypatch.setattr(t, "plot_curves", full_png)
    rc = main(["train", "--recipe", "demo", "--data", str(cifar), "--steps", "2", "--batch-size", "16",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "No space left on device" in err and ".safetensors" in err and "curves.png" not in err
    assert not list((tmp_path / "run").glob("*.safetensors")) and not list((tmp_path / "run").glob(".*.tmp"))
