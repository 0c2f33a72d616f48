"""BiT and hybrids through the ViT's commands (train, eval, predict, inspect), the 32-px presets,
and a smoke run of benchmarks/compute/compare.py on tiny data."""
import json

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import vitlab
from vitlab.cli import main
from vitlab.recipes import recipe
from vitlab.run import read_metrics
from vitlab.trainconfig import override

from helpers import load_benchmark, write_cifar

TINY_BIT = ["--model", "bit_r26x1_32px", "--layers", "1", "1", "--stem-width", "8", "--num-groups", "4"]
TINY_HYBRID = ["--model", "r8_vit_mu4_32px", "--resnet-layers", "1", "--resnet-width", "8", "--num-groups", "4",
               "--width", "32", "--depth", "2", "--mlp-dim", "64", "--num-heads", "2"]
COMMON = ["--steps", "4", "--batch-size", "16", "--eval-every", "2", "--threads", "1", "--precision", "fp32"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("data") / "cifar-10-batches-bin")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.new("RGB", (40, 36), (30 + 90 * i, 100, 50)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train_run(args, cifar, run, capsys):
    assert main(["train", "--data", str(cifar), *args, *COMMON, "--out", str(run)]) == 0
    assert "test accuracy after 4 steps" in capsys.readouterr().out
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # finite
    return json.loads((run / "config.json").read_text())


def test_bit_trains_evaluates_predicts_and_inspects_without_attention(cifar, images, tmp_path, capsys):
    run = tmp_path / "bit"
    config = train_run(TINY_BIT, cifar, run, capsys)
    assert config["model_type"] == "BiTConfig" and config["model"]["layers"] == [1, 1]
    assert config["model"]["stem_width"] == 8 and config["model"]["num_classes"] == 10
    model = vitlab.load_model(run / "last.safetensors").model
    assert isinstance(model, vitlab.ResNetV2) and model.cfg.stem_stride == 2 and not model.cfg.stem_pool

    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 20
    assert main(["predict", str(run), str(images / "im0.png"), "--top-k", "3"]) == 0
    assert len(capsys.readouterr().out.split(": ", 1)[1].split(", ")) == 3

    out = tmp_path / "inspect"
    assert main(["inspect", str(run), "--images", str(images), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "ResNetV2 has no attention layers" in captured.err and str(out / "report.html") in captured.out
    assert not list(out.glob("*.png"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attention"] is None and len(summary["predictions"]) == 2
    assert summary["card"]["architecture"].startswith("layers (1, 1), width_factor 1, stem_width 8")
    report = (out / "report.html").read_text()
    assert "no attention layers" in report and "bit_r26x1_32px" in report and "prediction: im1.png" in report


def test_hybrid_trains_and_inspects_with_attention(cifar, images, tmp_path, capsys):
    run = tmp_path / "hybrid"
    config = train_run(TINY_HYBRID, cifar, run, capsys)
    assert config["model_type"] == "HybridConfig" and config["model"]["resnet_layers"] == [1]
    assert main(["eval", str(run / "last.safetensors"), "--data", str(cifar), "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["top1"] <= 1
    out = tmp_path / "inspect"
    assert main(["inspect", str(run), "--images", str(images), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["attention_000_im0.png", "attention_001_im1.png",
                                                         "attention_distance.png", "posemb_similarity.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["mean_attention_distance"]) == 2  # layers
    assert summary["uniform_attention_distance"] > 4  # an 8 x 8 grid of 4-px cells on 32 px


def test_model_options_of_each_family_and_recipes_with_another_model():
    assert main(["train", "--model", "bit_r26x1_32px", "--depth", "2", "--steps", "1"]) == 2  # not a BiT field
    cfg = override(recipe("cifar10"), model="bit_r26x1_32px", width_factor=2, stem_pool=True)
    assert cfg.model_overrides == {"width_factor": 2, "stem_pool": True}  # the recipe's drop_path went
    assert override(recipe("demo"), model="vit_ti4_32px").model_overrides == {"patch_size": 8}


@pytest.mark.parametrize("overrides", [{}, {"stem_stride": 1}, {"stem_kernel": 7, "stem_pool": True}])
def test_small_bit_stems_flops_are_exact(overrides):
    model = vitlab.create_model("bit_r26x1_32px", layers=(1, 1), **overrides).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fmap = model.forward_features(torch.randn(2, 3, 32, 32))
        model.forward_head(model.pool(fmap))
    assert counter.get_total_flops() == 2 * vitlab.count_flops(model)
    stride = {(): 2, ("stem_stride",): 1}.get(tuple(overrides), 4)
    assert fmap.shape == (2, 128, 32 // stride // 2, 32 // stride // 2)


def test_32px_presets():
    expected = {"bit_r26x1_32px": (880_474, (2, 512, 2, 2)), "bit_r26x2_32px": (3_499_178, (2, 1024, 2, 2))}
    for name, (params, shape) in expected.items():
        model = vitlab.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == params
        assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == shape
    hybrid = vitlab.create_model("r8_vit_mu4_32px")
    assert hybrid.cfg.num_patches == 64 and hybrid(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert vitlab.create_model("vit_mu8_32px").cfg.num_patches == 16
    with pytest.raises(ValueError, match="stem_kernel and stem_stride must be >= 1"):
        vitlab.create_model("bit_r26x1_32px", stem_stride=0)


def test_compare_benchmark_smoke(cifar, tmp_path):
    compare = load_benchmark("compute/compare")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Another benchmark\n\nkept\n")
    args = ["--data", str(cifar), "--models", "vit_mu8_32px", "--budgets", "16", "32", "--train-images", "40",
            "--test-images", "10", "--batch-size", "16", "--out", str(tmp_path / "runs"),
            "--plot", str(tmp_path / "compare.png"), "--results", str(results)]
    assert compare.main(args) == 0
    rows = json.loads((tmp_path / "runs" / "results.json").read_text())["rows"]
    gflops = vitlab.count_flops(vitlab.create_model("vit_mu8_32px")) / 1e9
    assert [r["images_seen"] for r in rows] == [16, 32] and [r["steps"] for r in rows] == [1, 2]
    assert all(r["train_flops"] == pytest.approx(3 * gflops * 1e9 * r["images_seen"]) for r in rows)
    text = results.read_text()
    assert text.count("## Performance versus compute") == 1 and "## Another benchmark\n\nkept" in text
    assert "| `vit_mu8_32px` | ViT | 823,434 |" in text and "uptime" in text and "Partial" not in text
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    compare.write_section(results, f"{compare.START}\nnew\n{compare.END}\n")  # replaces only its own section
    assert results.read_text() == "# Results\n\n## Another benchmark\n\nkept\n\n" + f"{compare.START}\nnew\n{compare.END}\n"


@pytest.mark.parametrize("dst", ["small.npz", "small.safetensors"])
def test_export_refuses_a_small_image_stem(tmp_path, dst):
    from vitlab.interop import export_model
    model = vitlab.create_model("bit_r26x1_32px", layers=(1,), num_groups=32, stem_width=32)
    with pytest.raises(ValueError, match="stem is a 7x7/2 convolution and a max-pool; this model has stem_kernel=3"):
        export_model(model, tmp_path / dst)
