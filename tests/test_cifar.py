"""Progressive resizing (train loop) and dynamic image size (ViT): the knobs of the cifar10 recipe."""
import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vitlab
from vitlab.config import ViTConfig
from vitlab.data import DataConfig
from vitlab.interop import export_model, export_onnx
from vitlab.models.vit import VisionTransformer
from vitlab.models.layers import drop_patches as vitlab_drop
from vitlab.recipes import RECIPES
from vitlab.budget import image_size_at, size_fractions
from vitlab.run import read_metrics
from vitlab.train import train
from vitlab.trainconfig import TrainConfig

from helpers import load_benchmark, write_cifar
from test_train import TINY


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(image_size=32, patch_size=4, num_classes=10, **TINY, **kw))


def test_image_size_rises_linearly_in_patch_multiples_then_stays():
    sizes = [image_size_at(s, 100, low=16, high=32, until=0.8, multiple=4) for s in range(100)]
    assert sizes[0] == 16 and sizes[79] == 28 and sizes[80:] == [32] * 20
    assert sizes == sorted(sizes) and {s % 4 for s in sizes} == {0}
    assert [sizes.count(s) for s in (16, 20, 24, 28)] == [20, 20, 20, 20]
    assert image_size_at(0, 100, low=0, high=32, until=0.8, multiple=4) == 32  # off


def test_size_fractions_sum_to_one():
    cfg = TrainConfig(model="vit_mu4_32px", model_overrides={"dynamic_image_size": True}, min_image_size=16,
                      resize_until=0.5, steps=10)
    assert size_fractions(cfg) == {16: 0.125, 20: 0.125, 24: 0.125, 28: 0.125, 32: 0.5}


def test_dynamic_image_size_resamples_posemb_in_the_graph():
    model = tiny_vit(dynamic_image_size=True)
    static = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), static(x))  # the model's own size: unchanged
    small = torch.randn(2, 3, 16, 16)
    model.forward_features(small).sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad[0, 1:].abs().sum() > 0
    with pytest.raises(ValueError, match="set_image_size"):
        static(small)


def test_progressive_resizing_needs_a_dynamic_model_and_a_valid_size():
    with pytest.raises(ValueError, match="dynamic_image_size"):
        TrainConfig(model="vit_mu4_32px", min_image_size=16)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        TrainConfig(model="vit_mu4_32px", model_overrides={"dynamic_image_size": True}, min_image_size=18)
    with pytest.raises(ValueError, match="below the model's image size"):
        TrainConfig(model="vit_mu4_32px", model_overrides={"dynamic_image_size": True}, min_image_size=32)


def test_a_resized_run_trains_at_rising_sizes_and_evaluates_at_full_size(tmp_path):
    data = write_cifar(tmp_path / "cifar-10-batches-bin")
    cfg = TrainConfig(model="vit_mu4_32px", model_overrides={**TINY, "dynamic_image_size": True},
                      data=DataConfig(path=str(data)), batch_size=16, steps=8, eval_every=8, threads=1,
                      precision="fp32", min_image_size=16, resize_until=0.5)
    result = train(cfg, tmp_path / "run", log=lambda msg: None)
    sizes = [r["image_size"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "image_size" in r]
    assert sizes == [16, 20, 24, 28, 32, 32, 32, 32]
    assert result.eval is not None and 0.0 <= result.eval["eval_top1"] <= 1.0


def test_cifar_recipes_are_documented_and_valid():
    for name in ("cifar10", "cifar10_plain", "cifar10_baseline"):
        assert RECIPES[name].source and RECIPES[name].description
        RECIPES[name].config.data_config()


def test_the_recipe_trains_with_spt_lsa_and_seq_pooling_from_the_command_line(tmp_path):
    from vitlab.cli import main
    data = write_cifar(tmp_path / "cifar-10-batches-bin")
    widths = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["train", "--recipe", "cifar10", "--data", str(data), "--steps", "2", "--batch-size", "16", "--threads", "1", *widths,
                 "--conv-stem", "--shifted-patches", "--locality-attention", "--pool", "seq", "--layer-scale", "0.1",
                 "--out", str(tmp_path / "run")]) == 0
    model = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["model_overrides"]
    assert model["conv_stem"] == [] and model["shifted_patches"] and model["locality_attention"]
    assert model["pool"] == "seq" and model["layer_scale"] == 0.1


def test_a_time_budget_sizes_a_resized_run(tmp_path):
    data = write_cifar(tmp_path / "cifar-10-batches-bin")
    cfg = TrainConfig(model="vit_mu4_32px", model_overrides={**TINY, "dynamic_image_size": True},
                      data=DataConfig(path=str(data)), batch_size=16, time_budget="3s", threads=1,
                      precision="fp32", min_image_size=16)
    result = train(cfg, tmp_path / "run", log=lambda msg: None)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["sized_by"]["step_s"] > 0 and result.step >= 1
    assert set(config["sized_by"]["step_s_by_size"]) == {"16", "32"}  # the smallest and the full size timed


def test_patch_dropout_keeps_a_random_subset_in_training_only():
    model = tiny_vit(patch_dropout=0.5, pool="gap", class_token=False)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 32, TINY["width"])  # half of the 64 patches
    tokens.sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    model.eval()
    assert model.forward_features(x).shape == (2, 64, TINY["width"])
    kept = vitlab_drop(torch.arange(2 * 5 * 1.0).reshape(2, 5, 1), 0.25, 1)
    assert kept.shape == (2, 4, 1) and kept[:, 0, 0].tolist() == [0.0, 5.0]  # the prefix token stays
    assert all(len(set(row)) == 3 and set(row) <= set(range(b * 5 + 1, b * 5 + 5))
               for b, row in enumerate(kept[:, 1:, 0].long().tolist()))
    with pytest.raises(ValueError, match="patch_dropout"):
        ViTConfig(patch_dropout=1.0)


def test_conv_stem_cuts_the_same_grid_counts_its_flops_and_is_not_exported(tmp_path):
    model = tiny_vit(conv_stem=(8, 16), pool="gap", class_token=False, dynamic_image_size=True,
                     fused_attention=False).eval()
    assert model.patch_embed.proj.kernel_size == (1, 1) and len(model.patch_embed.stem) == 6
    for size in (32, 16):  # progressive resizing runs it at smaller sizes too
        assert model.forward_features(torch.randn(2, 3, size, size)).shape == (2, (size // 4) ** 2, TINY["width"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    assert counter.get_total_flops() == 3 * vitlab.count_flops(model)
    with pytest.raises(ValueError, match="power of two at most 4, got 8"):
        ViTConfig(patch_size=8, conv_stem=(8, 16))
    deeper = tiny_vit(conv_stem=(8, 16, 16), pool="gap", class_token=False, fused_attention=False).eval()
    assert [m.stride for m in deeper.patch_embed.stem if isinstance(m, nn.Conv2d)] == [(2, 2), (2, 2), (1, 1)]
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # the stride-1 conv: at the 8 x 8 grid
        deeper(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() == vitlab.count_flops(deeper) > vitlab.count_flops(model)
    with pytest.raises(ValueError, match="convolutional stem"):
        export_model(model, tmp_path / "m.npz")
    assert export_onnx(model, tmp_path / "m.onnx", dynamic_batch=True) < 1e-4  # ONNX holds it
    with pytest.raises(ValueError, match="without --dynamic-size"):
        export_onnx(model, tmp_path / "m2.onnx", dynamic_size=True)


def test_conv_stem_channels_last_matches_nchw_forward_and_backward(monkeypatch):
    from vitlab import accel as vit

    torch.manual_seed(0)
    model = vit.accelerate(tiny_vit(conv_stem=(8, 16, 16), pool="gap", class_token=False)).train()
    x = torch.randn(4, 3, 32, 32)
    seen = []
    model.patch_embed.stem[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))

    def run(channels_last: bool, precision: str):
        monkeypatch.setattr(vit, "STEM_CHANNELS_LAST", channels_last)
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        out.float().square().sum().backward()
        return out.float(), [p.grad.clone() for p in model.parameters()]

    for precision, tol in (("fp32", 1e-4), ("bf16", 3e-2)):
        ref, ref_grads = run(False, precision)
        out, grads = run(True, precision)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        for g, r in zip(grads, ref_grads):
            assert ((g - r).norm() / r.norm().clamp_min(1e-12)).item() < tol
    assert seen == [True, False] * 2  # the stem really ran on NHWC images


def test_budget_table_versions_recipes_by_what_they_set(monkeypatch):
    budget = load_benchmark("cifar/cifar10_budget")
    version = budget.recipe_version("cifar10")
    cfg = RECIPES["cifar10"].config
    monkeypatch.setitem(RECIPES, "cifar10", replace(RECIPES["cifar10"], config=replace(cfg, eval_batch_size=256)))
    assert budget.recipe_version("cifar10") == version  # setting a default (or a new field's) is no change
    monkeypatch.setitem(RECIPES, "cifar10", replace(RECIPES["cifar10"], config=replace(cfg, label_smoothing=0.2)))
    changed = budget.recipe_version("cifar10")
    assert changed != version

    def point(v, minutes, top1, date):
        return {"recipe": "cifar10", "recipe_version": v, "budget_min": minutes, "seed": 0, "test_top1": top1,
                "test_top5": 0.9, "wall_s": 60.0 * minutes, "steps": 10, "epochs": 1.0, "precision": "bf16",
                "load_mean": 2.0, "load_max": 2.1, "date": date, "cpu": "cpu", "cores": "2", "torch": "t",
                "python": "p", "git": "g", "command": f"vitlab train ... {minutes}m"}

    points = [point("oldest", 10, 0.3, "2026-01-01"), point(version, 30, 0.7, "2026-01-02"),
              point(version, 60, 0.75, "2026-01-03"), point(changed, 30, 0.8, "2026-01-04")]
    assert budget.previous(points) == points[1:3]  # the last earlier version only
    rows = [ln for ln in budget.section(points).splitlines() if ln.startswith("| `")]
    assert rows == [r for r in rows if "80.00%" in r or "earlier" in r] and len(rows) == 3
    assert "| `cifar10`, *earlier recipe* | 60 min |" in rows[2]
