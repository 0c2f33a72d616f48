"""Transfer: head and position-embedding surgery, freezing, fine-tuning and few-shot from a saved checkpoint."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.cli import main
from vitlab.config import replace_checked
from vitlab.data import DataConfig, build_data
from vitlab.features import cached_features, extract_features
from vitlab.models import build_model, create_model
from vitlab.surgery import adapt_model, freeze, load_pretrained
from vitlab.transfer import finetune_config
from helpers import write_cifar

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("data") / "cifar-10-batches-bin", per_batch=10)


def pretrained(path: Path, **kw) -> Path:
    """A saved checkpoint with random (non-zero) head and weights, like a pre-trained one."""
    torch.manual_seed(0)
    model = create_model("vit_mu4_32px", **{**TINY, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vitlab.save_model(model, path, class_names=[f"c{i}" for i in range(10)])
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return pretrained(tmp_path_factory.mktemp("ckpt") / "pre.safetensors", representation_size=24)


# ---------------------------------------------------------------- surgery

def test_head_is_zero_and_posemb_is_the_scipy_zoom(checkpoint):
    model = vitlab.load_model(checkpoint).model
    old = model.pos_embed.detach().clone()  # (1, 1 + 8*8, D)
    adapt_model(model, num_classes=5, image_size=48)
    assert model.head.out_features == 5 and not model.head.weight.any() and not model.head.bias.any()
    assert isinstance(model.pre_logits, torch.nn.Identity) and model.cfg.representation_size is None
    assert model.cfg.grid_size == (12, 12) and model.cfg.posemb_mode == "scipy"
    new = model.pos_embed.detach()
    assert new.shape == (1, 1 + 144, 32)
    assert torch.equal(new[:, 0], old[:, 0])  # the [class] token's embedding is kept
    grid = old[0, 1:].reshape(8, 8, 32).double().numpy()
    zoomed = scipy.ndimage.zoom(grid, (12 / 8, 12 / 8, 1), order=1)  # the official code's resampling
    assert np.allclose(new[0, 1:].reshape(12, 12, 32).numpy(), zoomed, atol=1e-5)
    assert model(torch.zeros(2, 3, 48, 48)).abs().max() == 0  # a zero head predicts nothing yet


def test_keep_pre_logits(checkpoint):
    model = vitlab.load_model(checkpoint).model
    weight = model.pre_logits[0].weight.detach().clone()
    adapt_model(model, num_classes=3, keep_pre_logits=True)
    assert torch.equal(model.pre_logits[0].weight, weight) and model.head.in_features == 24
    assert model.cfg.image_size == 32 and not model.head.weight.any()


def test_load_pretrained_into_the_finetune_config(checkpoint, cifar):
    cfg = finetune_config(checkpoint, str(cifar), image_size=40)
    assert cfg.model == "vit_mu4_32px" and cfg.init_from == str(Path(checkpoint).resolve())
    assert cfg.optim.optimizer == "sgd" and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 0
    assert cfg.batch_size == 512 and cfg.optim.warmup_steps == 500 and cfg.optim.clip_grad_norm == 1.0
    model = build_model(cfg.model_config(num_classes=7))
    load_pretrained(model, cfg.init_from)
    source = vitlab.load_model(checkpoint).model
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert model.pos_embed.shape[1] == 1 + 100 and model.head.out_features == 7 and not model.head.weight.any()
    wider = build_model(replace_checked(cfg.model_config(num_classes=7), width=64))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_pretrained(wider, cfg.init_from)


def trained_modules(model) -> set[str]:
    """Top-level modules (blocks by index) with a parameter that requires grad."""
    return {".".join(n.split(".")[:2]) if n.startswith("blocks.") else n.split(".")[0]
            for n, p in model.named_parameters() if p.requires_grad}


def test_freeze():
    model = create_model("vit_mu4_32px", **TINY)
    freeze(model, 0)
    assert trained_modules(model) == {"head"}
    freeze(model, 1)
    assert trained_modules(model) == {"head", "norm", "blocks.1"}
    freeze(model, -1)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="train_blocks 3 exceeds the model's 2 blocks"):
        freeze(model, 3)


def test_a_bit_resnet_checkpoint_fine_tunes_too(cifar, tmp_path):
    torch.manual_seed(0)
    bit = create_model("bit_r50x1", layers=(1, 1), stem_width=8, num_groups=4, image_size=32, num_classes=10)
    vitlab.save_model(bit, tmp_path / "bit.safetensors", meta={"model": "bit_r50x1"})
    cfg = finetune_config(tmp_path / "bit.safetensors", str(cifar), image_size=48, train_blocks=1)
    assert cfg.model == "bit_r50x1" and "posemb_mode" not in cfg.model_overrides
    model = build_model(cfg.model_config(num_classes=5))
    load_pretrained(model, cfg.init_from)
    freeze(model, cfg.train_blocks)
    assert torch.equal(model.conv_root.weight, bit.conv_root.weight) and not model.head.weight.any()
    assert trained_modules(model) == {"head", "norm", "stages"}  # the last residual unit only
    assert not any(p.requires_grad for p in model.stages[0].parameters())
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 5)


# ---------------------------------------------------------------- fine-tuning end to end

def test_finetune_cli_sweeps_then_trains_from_a_checkpoint(checkpoint, cifar, tmp_path, capsys):
    out = tmp_path / "ft"
    code = main(["finetune", "--from", str(checkpoint), "--data", str(cifar), "--image-size", "40", "--out", str(out),
                 "--lr", "0.01,0.03", "--steps", "3", "--batch-size", "16", "--accum-steps", "2",
                 "--warmup-steps", "1", "--train-blocks", "1", "--minival", "0.2", "--threads", "1",
                 "--precision", "fp32", "--crop", "pad"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "<- chosen" in printed and "test top-1" in printed
    summary = json.loads((out / "finetune.json").read_text())
    assert [s["lr"] for s in summary["sweep"]] == [0.01, 0.03] and summary["lr"] in (0.01, 0.03)
    assert 0 <= summary["test_top1"] <= 1
    sweep_cfg = json.loads((out / "lr_0.01" / "config.json").read_text())
    assert sweep_cfg["train"]["data"]["val_split"] == 0.2  # the sweep holds out a minival ...
    final_cfg = json.loads((out / "final" / "config.json").read_text())
    assert final_cfg["train"]["data"]["val_split"] == 0.0  # ... the final run trains on all of train
    assert final_cfg["train"]["optim"]["lr"] == summary["lr"]

    tuned = vitlab.load_model(out / "final" / "last.safetensors").model
    source = vitlab.load_model(checkpoint).model
    adapt_model(source, num_classes=10, image_size=40)
    assert tuned.cfg.image_size == 40 and tuned.head.weight.any()  # the zero head learned
    assert torch.equal(tuned.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)  # frozen
    assert torch.equal(tuned.pos_embed, source.pos_embed)  # frozen, resampled once
    # trained (from step 2 on: the zero head passes no gradient back at step 1)
    assert not torch.equal(tuned.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_finetune_rejects_conflicting_freezing(checkpoint, cifar, tmp_path, capsys):
    code = main(["finetune", "--from", str(checkpoint), "--data", str(cifar), "--out", str(tmp_path / "x"),
                 "--freeze", "backbone", "--train-blocks", "2"])
    assert code == 2 and "--freeze backbone trains the head only" in capsys.readouterr().err


# ---------------------------------------------------------------- few-shot

def test_feature_cache_computes_only_missing_rows(checkpoint, cifar, tmp_path):
    model = vitlab.load_model(checkpoint).model
    data = build_data(DataConfig(path=str(cifar)), log=lambda m: None)
    calls = []

    def compute(idx):
        calls.append(idx.tolist())
        return extract_features(model, data.train.subset(idx), DataConfig(path=str(cifar)), progress=False)

    key = {"test": 1}
    a, n = cached_features(key, tmp_path, torch.tensor([3, 1]), compute)
    b, m = cached_features(key, tmp_path, torch.tensor([1, 2, 3]), compute)
    assert (n, m) == (2, 1) and calls == [[1, 3], [2]]
    assert torch.equal(b[[2, 0]], a)  # rows of 3 and 1, cached
    direct = extract_features(model, data.train.subset(torch.tensor([1, 2, 3])), DataConfig(path=str(cifar)),
                              progress=False)
    assert torch.allclose(b, direct, atol=1e-6)
    with pytest.raises(ValueError, match="no feature 'blok_00'; choose one of stem, with_posemb, block_00"):
        extract_features(model, data.train.subset(torch.tensor([0])), DataConfig(path=str(cifar)),
                         feature="blok_00", progress=False)
    encoded = extract_features(model, data.test, DataConfig(path=str(cifar)), feature="encoded", progress=False)
    pooled = extract_features(model, data.test, DataConfig(path=str(cifar)), feature="head_input", progress=False)
    assert torch.equal(encoded, pooled)  # token sequences are pooled as the model pools


def test_fewshot_cli_table_json_and_cache(checkpoint, cifar, tmp_path, capsys):
    args = ["fewshot", "--from", str(checkpoint), "--data", str(cifar), "--shots", "1,3", "--seeds", "2",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args + ["--probe", "logistic"]) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "few-shot linear evaluation of pre_logits: 10 classes, 2 seed(s), 20 test images" in table
    rows = [line.split() for line in table.splitlines() if line.strip().startswith(("1 ", "3 "))]
    assert [r[0] for r in rows] == ["1", "3"] and all(len(r) == 7 for r in rows)  # shots, ridge ± , logistic ±
    computed = re.search(r"features: train (\d+) computed, test 20 computed", table)
    assert computed and 30 <= int(computed.group(1)) <= 50  # only the drawn images: 3 to 5 per class
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["computed"] == {"train": 0, "test": 0}  # the second time everything comes from the cache
    assert [r["shots"] for r in report["ridge"]] == [1, 3] and len(report["ridge"][0]["accuracies"]) == 2
    assert all(0 <= a <= 1 for r in report["ridge"] for a in r["accuracies"])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    cached = load_file(next((tmp_path / "cache").glob("*.safetensors")))
    assert cached["features"].shape[1] == 24  # pre_logits: the representation layer's width


def test_fewshot_more_shots_than_a_class_has(checkpoint, cifar, tmp_path, capsys):
    code = main(["fewshot", "--from", str(checkpoint), "--data", str(cifar), "--shots", "1,6",
                 "--cache-dir", str(tmp_path)])
    assert code == 2
    assert "class 0 has 5 training examples, fewer than the 6 shots asked for" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # the error comes before any feature is extracted


def test_fewshot_on_some_classes_of_the_data(checkpoint, cifar, tmp_path, capsys):
    args = ["fewshot", "--from", str(checkpoint), "--data", str(cifar), "--shots", "1,2", "--seeds", "1",
            "--cache-dir", str(tmp_path), "--json"]
    assert main(args + ["--classes", "5", "6", "7"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == [5, 6, 7] and report["num_classes"] == 3 and report["num_test"] == 6
    assert report["computed"] == {"train": 6, "test": 6}
    assert main(args + ["--classes", "7", "6", "5"]) == 0  # another selection: its own cache entries
    assert json.loads(capsys.readouterr().out)["computed"]["test"] == 6
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
