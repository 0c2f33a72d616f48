"""Exported models on CPU runtimes (ONNX Runtime, OpenVINO; fp32 and INT8) run like the PyTorch one."""
import onnx
import pytest
import torch

import vitlab
from vitlab.cli import main
from vitlab.deploy import check_export, export, load_exported
from vitlab.evaluate import evaluate_checkpoint, split_loader

from helpers import write_cifar

ov = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model that learned the tiny CIFAR's colours (a few steps), saved with its labels."""
    root = tmp_path_factory.mktemp("deploy")
    data = write_cifar(root / "cifar", per_batch=40, n_test=60)
    run = root / "run"
    assert main(["train", "--model", "vit_mu4_32px", "--data", str(data), "--steps", "30", "--batch-size", "32",
                 "--width", "32", "--depth", "2", "--mlp-dim", "64", "--num-heads", "2", "--lr", "3e-3",
                 "--eval-every", "1000", "--out", str(run)]) == 0
    return run / "last.safetensors", data


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_fp32_export_predicts_and_evaluates_as_pytorch(trained, tmp_path, suffix, capsys):
    model_file, data = trained
    dst = tmp_path / f"m{suffix}"
    assert main(["export", str(model_file), str(dst), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement with PyTorch fp32 100.00%" in out and "+0.00 points" in out
    exported = load_exported(dst)
    assert exported.model.runtime == {".onnx": "onnxruntime", ".xml": "openvino"}[suffix]
    reference = vitlab.load_model(model_file)
    assert exported.class_names == reference.class_names and exported.config == reference.config
    for batch in (1, 5):  # any batch size
        x = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(exported.model(x), reference.model(x), atol=1e-4, rtol=1e-4)
    ours, _ = evaluate_checkpoint(str(dst), data=str(data))  # the runtime found from the suffix
    theirs, _ = evaluate_checkpoint(str(model_file), data=str(data))
    assert ours.top1 == theirs.top1 and torch.equal(ours.confusion, theirs.confusion)
    image = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    capsys.readouterr()
    assert main(["predict", str(dst), str(image)]) == 0
    got = capsys.readouterr().out
    assert main(["predict", str(model_file), str(image)]) == 0
    assert got.split(": ")[1].split()[0] == capsys.readouterr().out.split(": ")[1].split()[0]  # same top class


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_int8_export_reports_its_cost_and_does_not_depend_on_the_batch(trained, tmp_path, suffix, capsys):
    model_file, data = trained
    fp32, int8 = tmp_path / f"f{suffix}", tmp_path / f"q{suffix}"
    assert main(["export", str(model_file), str(fp32), "--no-check"]) == 0
    assert main(["export", str(model_file), str(int8), "--int8", "--data", str(data),
                 "--calibration-images", "64"]) == 0
    out = capsys.readouterr().out
    assert "INT8" in out and "top-1 agreement with PyTorch fp32" in out and "points)" in out
    weights = (lambda p: p.stat().st_size) if suffix == ".onnx" else (lambda p: p.with_suffix(".bin").stat().st_size)
    assert weights(int8) < 0.6 * weights(fp32)  # int8 weights
    model = load_exported(int8).model
    x = torch.randn(12, 3, 32, 32)
    one_by_one = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    # Static INT8 (OpenVINO) is per image; ONNX Runtime's dynamic INT8 quantises each batch's activations.
    tolerance = 0.05 if suffix == ".xml" else 0.5
    assert (model(x) - one_by_one).abs().max() < tolerance
    reference = vitlab.load_model(model_file)
    loader, split, _ = split_loader(reference, str(data))
    check = check_export(reference.model, model, loader.epoch(0))
    assert split == "test" and check.images == 60 and check.agreement >= 0.8 and check.max_logit_diff < 2.0
    assert abs(check.top1 - check.reference_top1) <= 0.1


def test_exported_files_fail_clearly(trained, tmp_path, capsys):
    model_file, data = trained
    assert main(["export", str(model_file), str(tmp_path / "q.xml"), "--int8"]) == 2  # no calibration images
    assert "pass --data PATH" in capsys.readouterr().err
    assert main(["export", str(model_file), str(tmp_path / "m.onnx"), "--no-check"]) == 0
    assert main(["eval", str(tmp_path / "m.onnx"), "--data", str(data), "--precision", "bf16"]) == 2
    assert "ONNX Runtime runs the file's own precision" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "m.onnx"), "--data", str(data), "--runtime", "torch"]) == 2
    assert "--runtime onnxruntime" in capsys.readouterr().err
    bare = onnx.load(str(tmp_path / "m.onnx"))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    assert main(["predict", str(tmp_path / "bare.onnx"), str(tmp_path / "x.png")]) == 2
    assert "has no vitlab metadata" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx is not a readable ONNX model"):
        load_exported(tmp_path / "junk.onnx")
    (tmp_path / "junk.xml").write_text("<net>")
    with pytest.raises(ValueError, match="junk.xml is not a readable OpenVINO model"):
        load_exported(tmp_path / "junk.xml")
    with pytest.raises(ValueError, match="an OpenVINO model is a .xml file"):
        export(vitlab.load_model(model_file), tmp_path / "m.ir", to="openvino")


def test_a_missing_runtime_is_a_one_line_error(trained, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kw):
        if name.split(".")[0] == "openvino":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    assert main(["export", str(trained[0]), str(tmp_path / "m.xml")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'vitlab[deploy]'" in err and err.count("\n") == 1
