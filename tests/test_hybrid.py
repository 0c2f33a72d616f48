import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vitlab
from vitlab.cli import main
from vitlab.models.hybrid import HybridViT
from helpers import n_params

# Official vit_jax hybrid configs, 224 px, 1000 classes; equal to timm's ports (same architecture).
HYBRID_PARAMS = {
    "r50_vit_b16": 98_659_112,  # timm vit_base_r50_s16_224
    "r50_vit_l32": 328_994_856,  # timm vit_large_r50_s32_224
    "r26_vit_s32": 36_431_912,  # timm vit_small_r26_s32_224
    "r_vit_ti16": 6_337_704,  # timm vit_tiny_r_s16_p8_224
}
TIMM_NAMES = {"r50_vit_b16": "vit_base_r50_s16_224", "r50_vit_l32": "vit_large_r50_s32_224",
              "r26_vit_s32": "vit_small_r26_s32_224", "r_vit_ti16": "vit_tiny_r_s16_p8_224"}
# Tokens (grid) at 224 and 384: R50 (3, 4, 9) is /16; four stages are /32; the stem alone
# (/4) with 8 x 8 patches is /32 too, as in the official code and timm.
GRIDS = {"r50_vit_b16": (14, 24), "r50_vit_l32": (7, 12), "r26_vit_s32": (7, 12), "r_vit_ti16": (7, 12)}


@pytest.mark.parametrize("name", sorted(HYBRID_PARAMS))
def test_hybrid_parameter_counts(name):
    with torch.device("meta"):
        assert n_params(vitlab.create_model(name)) == HYBRID_PARAMS[name]


@pytest.mark.parametrize("name", sorted(HYBRID_PARAMS))
def test_hybrid_parameter_counts_equal_timm(name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=21843)
        ours = vitlab.create_model(name, num_classes=21843)
    assert n_params(ours) == n_params(ref)


def test_presets_follow_the_official_configs():
    b16 = vitlab.model_config("r50_vit_b16")
    assert (b16.resnet_layers, b16.resnet_width, b16.patch_size, b16.width, b16.depth) == ((3, 4, 9), 64, 1, 768, 12)
    assert b16.feature_channels == 1024 and b16.feature_stride == 16
    l32 = vitlab.model_config("r50_vit_l32")
    assert (l32.resnet_layers, l32.width, l32.depth, l32.feature_channels) == ((3, 4, 6, 3), 1024, 24, 2048)
    assert vitlab.model_config("r26_vit_s32").resnet_layers == (2, 2, 2, 2)
    ti = vitlab.model_config("r_vit_ti16")
    assert (ti.resnet_layers, ti.patch_size, ti.feature_channels) == ((), 8, 64)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_forward_shapes_at_224_and_384(name):
    cfg = vitlab.model_config(name)
    # One block and a half-width ResNet keep this fast; the token grid does not depend on them.
    model = vitlab.create_model(name, depth=1, resnet_width=32).eval()
    sizes = (224, 384) if name == "r50_vit_b16" else (224,)  # the paper's hybrid runs at both
    for size, side in zip(sizes, GRIDS[name]):
        if size != 224:
            model.set_image_size(size)
        assert model.cfg.grid_size == (side, side) and model.pos_embed.shape == (1, 1 + side * side, cfg.width)
        with torch.no_grad():
            feats = model.features(torch.randn(1, 3, size, size))
        assert feats["stem"].shape == (1, side * side, cfg.width)
        assert feats["encoded"].shape == (1, 1 + side * side, cfg.width)
        assert feats["pre_logits"].shape == (1, cfg.width)
        assert feats["logits"].shape == (1, 1000)
    model.set_image_size(384)
    assert model.cfg.grid_size == (GRIDS[name][1],) * 2


def tiny(**kw):
    kw = {"num_classes": 4, "image_size": 32, "resnet_layers": (1, 1), "resnet_width": 16, "num_groups": 8,
          "width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 4, **kw}
    return vitlab.create_model("r50_vit_b16", **kw)


def test_hybrid_is_a_vit_with_all_its_seams():
    model = tiny().eval()
    assert isinstance(model, vitlab.VisionTransformer)
    x = torch.randn(2, 3, 32, 32)
    assert model.patch_embed.feature_map(x).shape == (2, 128, 4, 4)
    assert model.forward_features(x).shape == (2, 17, 32)
    w = model.blocks[0].attn.attention_weights(model.blocks[0].norm1(model.embed(x)))
    assert w.shape == (2, 4, 17, 17)  # attention maps as for the ViT
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    model.reset_head(3)
    assert model(x).shape == (2, 3) and model.cfg.num_classes == 3


def test_bad_input_and_config():
    with pytest.raises(ValueError, match="not divisible by 8"):
        tiny()(torch.randn(1, 3, 36, 36))
    with pytest.raises(ValueError, match="expected 3 channels"):
        tiny()(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="expected 32x32 images, got 64x64"):
        tiny()(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="not divisible by 16"):
        vitlab.create_model("r50_vit_b16", image_size=200)
    with pytest.raises(ValueError, match="resnet_layers"):
        vitlab.model_config("r50_vit_b16", resnet_layers=(3, 0, 9))


# --- numerics against timm -------------------------------------------------------------

@pytest.mark.parametrize("name", ["r50_vit_b16", "r26_vit_s32", "r_vit_ti16"])  # R50+L/32 is R26+S/32's code
def test_logits_match_timm(name):
    timm = pytest.importorskip("timm")
    from vitlab.interop import import_model

    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAMES[name], pretrained=False, img_size=64, depth=1, num_classes=10).eval()
    for key, p in ref.named_parameters():  # non-trivial norms and head
        if "norm" in key or "head" in key:
            torch.nn.init.normal_(p, std=0.5)
    ours, _ = import_model(ref.state_dict(), like=vitlab.model_config(name, image_size=64, depth=1, num_classes=10))
    assert (ours.cfg.gn_eps, ours.cfg.ws_eps) == (1e-5, 1e-8)  # timm's numerics, kept from the source
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-4


# --- training, FLOPs, checkpoints -------------------------------------------------------

def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = tiny()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kw", [{}, {"resnet_layers": (), "patch_size": 2}, {"resnet_layers": (1, 1, 1), "representation_size": 24}])
def test_count_flops_matches_flop_counter(kw):
    model = tiny(fused_attention=False, **kw).eval()  # explicit attention: matmuls the counter sees
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert counter.get_total_flops() == 2 * vitlab.count_flops(model)
    model.set_image_size(64)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert counter.get_total_flops() == vitlab.count_flops(model)


def test_checkpoint_round_trip(tmp_path):
    model = tiny(resnet_layers=()).eval()
    torch.nn.init.normal_(model.head.weight)
    vitlab.save_model(model, tmp_path / "hybrid.safetensors")
    loaded = vitlab.load_model(tmp_path / "hybrid.safetensors").model.eval()
    assert isinstance(loaded, HybridViT) and loaded.cfg == model.cfg
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_cli_models_lists_hybrids(capsys):
    assert main(["models", "r_vit_ti16"]) == 0
    out = capsys.readouterr().out
    assert "6,337,704" in out and "50" in out and "224x224" in out
