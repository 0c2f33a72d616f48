from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vitlab
from vitlab.cli import main
from vitlab.models.resnet import StdConv2d, pad_same, standardize_weight
from helpers import n_params

# Official BiT shapes (google-research/big_transfer); equal to timm's resnetv2_{50x1,...}_bit.
BIT_PARAMS = {  # 1000 classes (BiT-S / ILSVRC-2012 heads), 21843 classes (BiT-M / ImageNet-21k)
    "bit_r50x1": (25_549_352, 68_256_659),
    "bit_r50x3": (217_319_080, 345_399_315),
    "bit_r101x1": (44_541_480, 87_248_787),
    "bit_r101x3": (387_934_888, 516_015_123),
    "bit_r152x4": (936_533_224, 1_107_299_923),
}
TIMM_NAMES = {"bit_r50x1": "resnetv2_50x1_bit", "bit_r50x3": "resnetv2_50x3_bit", "bit_r101x1": "resnetv2_101x1_bit",
              "bit_r101x3": "resnetv2_101x3_bit", "bit_r152x4": "resnetv2_152x4_bit"}


@pytest.mark.parametrize("name", sorted(BIT_PARAMS))
def test_bit_parameter_counts(name):
    with torch.device("meta"):  # shapes only: the 936M-parameter R152x4 costs nothing
        assert n_params(vitlab.create_model(name)) == BIT_PARAMS[name][0]
        assert n_params(vitlab.create_model(name, num_classes=21843)) == BIT_PARAMS[name][1]


@pytest.mark.parametrize("name", sorted(BIT_PARAMS))
def test_bit_parameter_counts_equal_timm(name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=21843)
        ours = vitlab.create_model(name, num_classes=21843)
    assert n_params(ours) == n_params(ref)


def test_presets_have_the_official_widths():
    cfg = vitlab.model_config("bit_r152x4")
    assert cfg.layers == (3, 8, 36, 3) and cfg.widths == (1024, 2048, 4096, 8192)
    assert vitlab.model_config("bit_r101x3").layers == (3, 4, 23, 3)
    assert vitlab.model_config("bit_r50x1").widths == (256, 512, 1024, 2048)


def tiny(**kw):
    kw = {"num_classes": 5, "layers": (1, 1, 1), "stem_width": 16, "num_groups": 8, **kw}
    return vitlab.create_model("bit_r50x1", **kw)


# --- GroupNorm + Weight Standardisation ------------------------------------------------

def test_gn_ws_conv_matches_direct_formula():
    torch.manual_seed(0)
    conv = StdConv2d(6, 8, 3, stride=2, eps=1e-10).double()
    gn = torch.nn.GroupNorm(4, 8, eps=1e-5).double()
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    w = conv.weight.detach()
    ref_w = torch.empty_like(w)
    for o in range(w.shape[0]):  # each filter: zero mean, unit population variance
        f = w[o]
        ref_w[o] = (f - f.mean()) / (((f - f.mean()) ** 2).mean() + 1e-10).sqrt()
    y = F.conv2d(x, ref_w, stride=2, padding=1)
    b, c, h, wd = y.shape
    g = y.reshape(b, 4, c // 4 * h * wd)
    g = (g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    ref = g.reshape(b, c, h, wd) * gn.weight[:, None, None] + gn.bias[:, None, None]
    assert torch.allclose(gn(conv(x)), ref, atol=1e-12)
    assert torch.allclose(ref_w.mean(dim=(1, 2, 3)), torch.zeros(8, dtype=torch.float64), atol=1e-12)


def test_standardised_conv_ignores_weight_scale_and_shift():
    conv = StdConv2d(3, 4, 3, eps=1e-10)
    x = torch.randn(1, 3, 8, 8)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(0.3)
    assert torch.allclose(conv(x), before, atol=1e-5)
    assert torch.allclose(standardize_weight(conv.weight, 1e-10).std(dim=(1, 2, 3), unbiased=False), torch.ones(4))


@pytest.mark.parametrize("n, k, s, pads", [(224, 7, 2, (2, 3)), (56, 3, 2, (0, 1)), (57, 3, 2, (1, 1)), (56, 1, 2, (0, 0)), (7, 3, 1, (1, 1))])
def test_tf_same_padding(n, k, s, pads):
    out = pad_same(torch.ones(1, 1, n, n), k, s)  # TF: total = (ceil(n/s) - 1) s + k - n, extra on the end
    assert out.shape[-2:] == (n + sum(pads), n + sum(pads))
    assert out.sum() == n * n and out[0, 0, pads[0], pads[0]] == 1
    assert F.conv2d(out, torch.ones(1, 1, k, k), stride=s).shape[-1] == -(-n // s)  # ceil(n / s)


# --- numerics against timm -------------------------------------------------------------

@pytest.mark.parametrize("layers, width_factor", [((3, 4, 6, 3), 1), ((1, 1, 1, 1), 2)])
def test_logits_match_timm(layers, width_factor):
    pytest.importorskip("timm")
    from timm.layers import StdConv2d as TimmStdConv2d
    from timm.models.resnetv2 import ResNetV2 as TimmResNetV2

    from vitlab.interop import import_model

    torch.manual_seed(0)
    ref = TimmResNetV2(layers=list(layers), width_factor=width_factor, num_classes=10, stem_type="fixed",
                       conv_layer=partial(TimmStdConv2d, eps=1e-8)).eval()  # = timm's _create_resnetv2_bit
    for name, p in ref.named_parameters():  # non-trivial norms and head
        if "norm" in name or "head" in name:
            torch.nn.init.normal_(p, std=0.5)
    like = vitlab.model_config("bit_r50x1", layers=layers, width_factor=width_factor, num_classes=10)
    ours, _ = import_model(ref.state_dict(), like=like)  # the timm key map of vitlab.interop
    assert ours.cfg.ws_eps == 1e-8  # timm's numerics
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-4


# --- seams, training, FLOPs ------------------------------------------------------------

def test_seams_and_features():
    model = tiny().eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 64, 64)
    feats = model.features(x)
    assert feats["stem"].shape == (2, 16, 16, 16)
    assert feats["stage_0"].shape == (2, 64, 16, 16)
    assert feats["stage_2"].shape == (2, 256, 4, 4)
    assert torch.equal(feats["encoded"], model.forward_features(x))
    assert (feats["encoded"] >= 0).all()  # final GroupNorm + ReLU
    assert feats["pre_logits"].shape == (2, 256) and torch.equal(feats["pre_logits"], feats["head_input"])
    assert torch.equal(feats["logits"], model(x))
    assert model.no_weight_decay() == set()
    assert model(torch.randn(1, 3, 40, 56)).shape == (1, 5)  # any resolution
    model.set_image_size(384)
    assert model.cfg.image_size == 384 and vitlab.count_flops(model) == vitlab.count_flops(model, 384)


def test_head_is_zero_and_reset_head():
    model = tiny()
    assert torch.equal(model(torch.randn(2, 3, 32, 32)), torch.zeros(2, 5))
    model.reset_head(3)
    assert model.head.weight.shape == (3, 256) and model.cfg.num_classes == 3
    model.reset_head(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 256)


def test_bad_input_and_config():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny()(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="num_groups"):
        tiny(stem_width=12)
    with pytest.raises(ValueError, match="did you mean"):
        tiny(width_factr=2)


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = tiny(num_classes=4)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("size", [32, 45, (40, 64)])
def test_count_flops_matches_flop_counter(size):
    model = tiny().eval()
    h, w = (size, size) if isinstance(size, int) else size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, h, w))
    assert counter.get_total_flops() == 2 * vitlab.count_flops(model, size)


def test_checkpoint_round_trip(tmp_path):
    model = tiny().eval()
    torch.nn.init.normal_(model.head.weight)
    vitlab.save_model(model, tmp_path / "bit.safetensors")
    loaded = vitlab.load_model(tmp_path / "bit.safetensors").model.eval()
    assert loaded.cfg == model.cfg
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_cli_models_lists_bit(capsys):
    assert main(["models", "bit_r50x1"]) == 0
    out = capsys.readouterr().out
    assert "25,549,352" in out and "8.18" in out and "224x224" in out
