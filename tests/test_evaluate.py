import json

import pytest
import torch
from PIL import Image
from torch import nn

import vitlab
from vitlab.cli import main
from vitlab.evaluate import evaluate, evaluate_checkpoint
from vitlab.plots import plot_confusion
from vitlab.predict import image_files, predict, write_csv


class FixedLogits(nn.Module):
    """Returns the logits stored for each input index (inputs carry the index in x[:, 0, 0, 0])."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def test_metrics_on_known_predictions():
    # 3 classes; class 2 never occurs. Predictions (top-1): 0->0, 0->1, 1->1, 1->1, 1->0.
    logits = torch.tensor([[3.0, 2, 1], [2, 3, 1], [1, 3, 2], [0, 3, 2], [3, 1, 2]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    x = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    batches = [(x[:3], labels[:3]), (x[3:], labels[3:])]
    r = evaluate(FixedLogits(logits), batches, class_names=["a", "b", "c"])
    assert r.num_images == 5 and r.top1 == pytest.approx(3 / 5)
    assert r.top5 == 1.0  # 3 classes: top-5 is every class
    assert r.confusion.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert r.per_class == [pytest.approx(0.5), pytest.approx(2 / 3), None]
    expected = nn.functional.cross_entropy(logits, labels).item()
    assert r.loss == pytest.approx(expected, rel=1e-6)
    d = r.to_dict()
    assert d["per_class"]["c"] is None and json.dumps(d)


def test_top5_with_many_classes():
    logits = torch.arange(10.0).repeat(4, 1)  # ranks classes 9, 8, 7, 6, 5 first
    labels = torch.tensor([9, 5, 4, 0])
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 1, 1)
    r = evaluate(FixedLogits(logits), [(x, labels)], class_names=[str(i) for i in range(10)])
    assert r.top1 == 0.25 and r.top5 == 0.5


class LeftVsRight(nn.Module):
    """Logits (left-half mean, right-half mean): mirroring an image swaps them."""

    def forward(self, x):
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))], 1)


def test_flip_tta_averages_each_image_with_its_mirror():
    x = torch.zeros(2, 3, 4, 4)
    x[0, :, :, :2] = 3.0  # bright left: logits (3, 0); mirrored (0, 3); averaged (1.5, 1.5)
    x[1, :, :, 2:] = 1.0  # bright right: (0, 1); averaged (0.5, 0.5)
    labels = torch.tensor([0, 1])
    plain = evaluate(LeftVsRight(), [(x, labels)], class_names=["left", "right"])
    tta = evaluate(LeftVsRight(), [(x, labels)], class_names=["left", "right"], flip_tta=True)
    assert plain.top1 == 1.0 and plain.loss < tta.loss
    assert tta.loss == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)  # equal logits: ln 2


def test_confusion_png(tmp_path):
    path = plot_confusion(torch.tensor([[5, 1], [0, 4]]), ["cat", "dog"], tmp_path / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def model_file(tmp_path):
    model = vitlab.create_model("vit_mu4_32px", width=32, depth=1, mlp_dim=64, num_heads=2, num_classes=3)
    nn.init.normal_(model.head.weight)
    return vitlab.save_model(model, tmp_path / "m.safetensors", class_names=["a", "b", "c"])


def test_preprocess_and_predict(model_file, tmp_path):
    loaded = vitlab.load_model(model_file)
    x = loaded.preprocess(Image.new("RGBA", (64, 48), (255, 0, 0, 128)))
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x[0].mean() == 1.0
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 40), (0, 200, 0)).save(folder / "sub" / "g.png")
    Image.new("L", (40, 40), 90).save(folder / "gray.jpg")
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    (folder / "notes.txt").write_text("not an image")
    files, any_dir = image_files([folder])
    assert any_dir and [f.name for f in files] == ["bad.png", "gray.jpg", "g.png"]
    with pytest.raises(ValueError, match="cannot read image"):
        predict(loaded, files)
    skipped = []
    preds = predict(loaded, files, top_k=5, skip_unreadable=True, log=skipped.append)
    assert len(preds) == 2 and "bad.png" in skipped[0]
    assert len(preds[0].labels) == 3 and sum(preds[0].probs) == pytest.approx(1.0, abs=1e-5)
    expected = loaded.model(loaded.preprocess(Image.open(folder / "gray.jpg").convert("RGB"))[None]).softmax(1)
    assert preds[0].probs[0] == pytest.approx(expected.max().item(), rel=1e-5)
    import io
    out = io.StringIO()
    write_csv(preds, out)
    assert out.getvalue().splitlines()[0] == "path,label_1,prob_1,label_2,prob_2,label_3,prob_3"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_files([tmp_path / "missing.png"])


def test_eval_errors_are_clear(model_file, tmp_path, capsys):
    with pytest.raises(ValueError, match="pass --data"):
        evaluate_checkpoint(model_file)
    assert main(["eval", str(model_file)]) == 2
    assert "pass --data" in capsys.readouterr().err
    root = tmp_path / "folder"
    for split in ("train", "val"):
        for name in ("x", "y", "z"):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "1.png")
    with pytest.raises(ValueError, match="differ from the data's"):
        evaluate_checkpoint(model_file, data=str(root))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["eval", str(bad), "--data", str(root)]) == 2
    assert "corrupted or truncated" in capsys.readouterr().err


# ---------------------------------------------------------------- ImageNet-ReaL (--real-labels)

def test_real_top1_matches_labels_by_sorted_file_name():
    from vitlab.evaluate import real_top1

    # the dataset's order (class folder by class folder) is not the file-name order of real.json
    files = ["val/b/ILSVRC2012_val_00000002.JPEG", "val/a/ILSVRC2012_val_00000004.JPEG",
             "val/a/ILSVRC2012_val_00000001.JPEG", "val/c/ILSVRC2012_val_00000003.JPEG"]
    predictions = torch.tensor([1, 0, 2, 2])  # ... of 00000002, 00000004, 00000001, 00000003
    labels = [[2, 5], [0], [], [0, 1]]  # for 00000001 (right), 00000002 (wrong), 00000003 (none), 00000004 (right)
    r = real_top1(predictions, files, labels, "real.json")
    assert (r.top1, r.num_images, r.num_skipped) == (2 / 3, 3, 1)
    with pytest.raises(ValueError, match="more than one class folder"):
        real_top1(predictions, ["a/x.png", "b/x.png", "c/y.png", "c/z.png"], labels)


@pytest.fixture
def real_folder(tmp_path):
    """An ImageNet-like val folder: class folders holding ILSVRC2012_val_*.png, names interleaved across them."""
    root = tmp_path / "imagenet"
    names = ["a", "b", "c"]
    for i in range(1, 10):
        for split in ("train", "val"):
            (root / split / names[i % 3]).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), (28 * i, 255 - 25 * i, (90 * i) % 256)).save(
                root / split / names[i % 3] / f"ILSVRC2012_val_{i:08d}.png")
    return root


def test_eval_real_labels_end_to_end(model_file, real_folder, tmp_path, capsys):
    from vitlab.evaluate import split_loader

    loaded = vitlab.load_model(model_file)
    loader, _, names = split_loader(loaded, str(real_folder), "val", log=lambda m: None)
    predicted = evaluate(loaded.model, loader, class_names=names, keep_predictions=True).predictions.tolist()
    by_name = sorted(zip((p.rsplit("/", 1)[1] for p, _ in loader.dataset.samples), predicted))
    labels = [[p] if i % 3 == 0 else [] if i % 3 == 1 else [(p + 1) % 3] for i, (_, p) in enumerate(by_name)]
    real = tmp_path / "real.json"
    real.write_text(json.dumps(labels))

    assert main(["eval", str(model_file), "--data", str(real_folder), "--split", "val", "--real-labels", str(real),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["real"] == {"top1": 0.5, "num_images": 6, "num_skipped": 3, "labels_file": str(real)}
    assert out["num_images"] == 9 and 0 <= out["top1"] <= 1  # the original top-1, on every image
    assert main(["eval", str(model_file), "--data", str(real_folder), "--split", "val", "--real-labels", str(real)]) == 0
    assert "ReaL top-1 50.00% (original top-1" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("[[0], [1]]", "holds labels for 2 images but the evaluated split has 9"),
    (json.dumps([[0]] * 8 + [[1.5]]), "image 8's labels hold 1.5, not a class index"),
    (json.dumps([[0]] * 8 + [["2"]]), "image 8's labels hold '2', not a class index"),
    (json.dumps([[0]] * 8 + [[True]]), "not a class index"),
    (json.dumps([[0]] * 8 + [[3]]), "hold 3, outside the model's 3 classes"),
    (json.dumps([[0]] * 8 + [[-1]]), "outside the model's 3 classes"),
    (json.dumps({"0": [1]}), "is not a list of label lists"),
    ("[[0], [1", "is not JSON"),
])
def test_bad_real_labels_are_one_line_and_exit_2(content, message, model_file, real_folder, tmp_path, capsys):
    real = tmp_path / "real.json"
    real.write_text(content)
    assert main(["eval", str(model_file), "--data", str(real_folder), "--split", "val", "--real-labels", str(real)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(real) in err
    assert "real.json" in err or "--split" in err or "ImageNet-1k" in err  # and the fix


def test_real_labels_need_an_image_folder_and_a_file(model_file, real_folder, tmp_path, capsys):
    from helpers import write_cifar

    cifar = write_cifar(tmp_path / "cifar-10-batches-bin", per_batch=2, n_test=4)
    ten = vitlab.create_model("vit_mu4_32px", width=32, depth=1, mlp_dim=64, num_heads=2)
    ten_file = vitlab.save_model(ten, tmp_path / "ten.safetensors")
    (tmp_path / "real.json").write_text("[[0], [1], [2], [3]]")
    assert main(["eval", str(ten_file), "--data", str(cifar), "--real-labels", str(tmp_path / "real.json")]) == 2
    assert "is not an image folder" in capsys.readouterr().err
    assert main(["eval", str(model_file), "--data", str(real_folder), "--real-labels", str(tmp_path / "no.json")]) == 2
    assert "ReaL labels file" in capsys.readouterr().err


def test_a_released_model_reads_imagenet_class_folders():
    from vitlab.checkpoint import LoadedModel
    from vitlab.evaluate import same_classes
    from vitlab.hub import labels, synsets

    model = vitlab.create_model("vit_mu4_32px", width=32, depth=1, mlp_dim=64, num_heads=2, num_classes=1000)
    released = LoadedModel(model, labels("imagenet1k"), {"pretrained": "vit_b16.augreg_in21k_ft_in1k"})
    assert labels("imagenet1k")[0] == "tench, Tinca tinca" and synsets("imagenet1k")[0] == "n01440764"
    assert same_classes(released, synsets("imagenet1k"))  # val/n01440764/ILSVRC2012_val_00000293.JPEG ...
    assert same_classes(released, labels("imagenet1k"))
    assert not same_classes(released, sorted(synsets("imagenet1k"))[::-1])
    assert not same_classes(LoadedModel(model, labels("imagenet1k")), synsets("imagenet1k"))  # a file: by name only
