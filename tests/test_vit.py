import pytest
import scipy.ndimage
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitlab
from vitlab.models.posemb import resample_posemb, sincos_2d
from helpers import n_params

PAPER_PARAMS = {  # 1000-class head, no representation layer (paper Table 1, official code)
    "vit_b16": 86_567_656,
    "vit_l16": 304_326_632,
    "vit_h14": 632_045_800,
    "vit_ti16": 5_717_416,
    "vit_s16": 22_050_664,
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_parameter_counts(name):
    with torch.device("meta"):  # shapes only: the big presets cost nothing
        model = vitlab.create_model(name)
    assert n_params(model) == PAPER_PARAMS[name]


@pytest.mark.parametrize("name", [n for n in vitlab.list_models("vit_") if n.startswith("vit_")])  # not the r*_vit_ hybrids
def test_every_preset_runs_forward(name):
    spec = vitlab.model_config(name)
    small = 2 * spec.patch_size  # a 2 x 2 grid keeps the big presets cheap
    big = spec.width >= 1024
    model = vitlab.create_model(name, image_size=small, depth=2 if big else None).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, small, small))
    assert out.shape == (2, spec.num_classes)
    assert torch.isfinite(out).all()


def tiny(**kw):
    kw = {"num_classes": 7, "width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 4, **kw}
    return vitlab.create_model("vit_mu4_32px", **kw)


def test_head_is_zero_initialised_and_logits_zero():
    model = tiny().eval()
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.equal(model(torch.randn(2, 3, 32, 32)), torch.zeros(2, 7))


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_fused_and_explicit_attention_agree(pool):
    torch.manual_seed(0)
    fused = tiny(pool=pool, fused_attention=True).eval()
    torch.nn.init.normal_(fused.head.weight)
    explicit = tiny(pool=pool, fused_attention=False).eval()
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = fused.forward_features(x), explicit.forward_features(x)
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(fused(x), explicit(x), atol=1e-5)


def test_attention_weights_are_a_distribution():
    model = tiny().eval()
    x = model.embed(torch.randn(2, 3, 32, 32))
    w = model.blocks[0].attn.attention_weights(model.blocks[0].norm1(x))
    assert w.shape == (2, 4, 65, 65)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 65), atol=1e-6)


def test_seams_and_features():
    model = tiny(representation_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.features(x)
    assert feats["stem"].shape == (2, 64, 64)
    assert feats["with_posemb"].shape == (2, 65, 64)
    assert feats["block_01"].shape == (2, 65, 64)
    assert torch.equal(feats["encoded"], model.forward_features(x))
    assert feats["head_input"].shape == (2, 64)
    assert feats["pre_logits"].shape == (2, 32)
    assert (feats["pre_logits"].abs() <= 1).all()  # tanh
    assert torch.equal(feats["logits"], model(x))


def test_gap_without_class_token():
    model = tiny(pool="gap", class_token=False).eval()
    assert model.pos_embed.shape == (1, 64, 64)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 64, 64)
    with pytest.raises(ValueError, match="class_token"):
        tiny(pool="token", class_token=False)


def test_reset_head():
    model = tiny(representation_size=32)
    model.reset_head(3, keep_pre_logits=False)
    assert model.head.weight.shape == (3, 64) and torch.count_nonzero(model.head.weight) == 0
    assert model.cfg.num_classes == 3 and model.cfg.representation_size is None
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(1, 1, 32, 32), "expected 3 channels, got 1"),
        (torch.randn(1, 3, 30, 32), "not divisible by patch size 4"),
        (torch.randn(3, 32, 32), r"\(B, C, H, W\)"),
        (torch.randn(1, 3, 64, 64), "expected 32x32 images, got 64x64"),
    ],
)
def test_bad_input_raises_clear_error(x, match):
    with pytest.raises(ValueError, match=match):
        tiny()(x)


def test_bad_config_and_name():
    with pytest.raises(ValueError, match="did you mean"):
        vitlab.create_model("vit_b17")
    with pytest.raises(ValueError, match="num_heads"):
        vitlab.create_model("vit_b16", num_head=3)
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        vitlab.create_model("vit_b16", image_size=200)


def test_eval_forward_is_deterministic():
    model = tiny(dropout=0.5, attention_dropout=0.5, drop_path=0.5).eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_backward_gives_finite_gradients_everywhere():
    model = tiny(representation_size=16, drop_path=0.1, dropout=0.1)
    torch.nn.init.normal_(model.head.weight)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_gelu_forms(gelu):
    model = tiny(gelu=gelu)
    assert model.blocks[0].mlp.act.approximate == ("none" if gelu == "exact" else "tanh")


# --- position embeddings -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "scipy"])
def test_resample_to_same_size_is_identity(mode):
    posemb = torch.randn(1, 1 + 49, 8)
    assert torch.equal(resample_posemb(posemb, (7, 7), mode=mode), posemb)


@pytest.mark.parametrize("old, new", [((7, 7), (12, 12)), ((14, 14), (24, 24)), ((8, 8), (6, 10)), ((12, 12), (5, 5))])
def test_scipy_mode_equals_scipy_zoom(old, new):
    torch.manual_seed(0)
    posemb = torch.randn(1, 1 + old[0] * old[1], 6, dtype=torch.float64)
    out = resample_posemb(posemb, new, old_grid=old, mode="scipy")
    grid = posemb[0, 1:].reshape(*old, 6).numpy()
    zoom = (new[0] / old[0], new[1] / old[1], 1)
    ref = scipy.ndimage.zoom(grid, zoom, order=1)
    assert ref.shape[:2] == new
    assert torch.equal(out[:, :1], posemb[:, :1])  # class token kept
    assert torch.allclose(out[0, 1:].reshape(*new, 6), torch.from_numpy(ref).to(out.dtype), atol=1e-6)


def test_bilinear_mode_matches_torch_interpolate():
    posemb = torch.randn(1, 1 + 16, 3)
    out = resample_posemb(posemb, (8, 8), mode="bilinear")
    grid = posemb[:, 1:].reshape(1, 4, 4, 3).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 64, 3))


def test_set_image_size_non_square_keeps_class_token():
    model = tiny().eval()
    cls_pos = model.pos_embed[:, :1].clone()
    model.set_image_size((32, 48), mode="scipy")
    assert model.pos_embed.shape == (1, 1 + 8 * 12, 64)
    assert torch.equal(model.pos_embed[:, :1], cls_pos)
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 7)


def test_create_model_with_image_size_builds_that_grid():
    model = vitlab.create_model("vit_ti16", image_size=(32, 64), depth=1)
    assert model.pos_embed.shape == (1, 1 + 2 * 4, 192)


def test_sincos_similarity_peaks_on_own_position():
    emb = torch.nn.functional.normalize(sincos_2d((6, 6), 64), dim=-1)
    sim = emb @ emb.T
    assert torch.equal(sim.argmax(dim=1), torch.arange(36))


# --- FLOPs ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"representation_size": 48}, {"pool": "gap", "class_token": False}])
def test_count_flops_matches_flop_counter(kw):
    model = tiny(fused_attention=False, **kw).eval()  # explicit attention: matmuls the counter sees
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    assert counter.get_total_flops() == 3 * vitlab.count_flops(model)


def test_count_flops_other_image_size():
    model = vitlab.create_model("vit_b16", depth=1, fused_attention=False).eval()
    model.set_image_size(64)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert counter.get_total_flops() == vitlab.count_flops(model)


# --- small-data options: SPT, LSA, sequence pooling, layer scale ---------------------------
SMALL_DATA = [{"layer_scale": 0.1}, {"pool": "seq", "class_token": False}, {"shifted_patches": True},
              {"locality_attention": True},
              {"shifted_patches": True, "locality_attention": True, "pool": "seq", "class_token": False}]


@pytest.mark.parametrize("kw", SMALL_DATA)
def test_small_data_options_count_flops_agree_fused_and_train(kw):
    from helpers import randomise
    explicit = randomise(tiny(fused_attention=False, **kw))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ref = explicit(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert counter.get_total_flops() == 3 * vitlab.count_flops(explicit)
    fused = tiny(**kw).eval()
    fused.load_state_dict(explicit.state_dict())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(fused(x), ref, atol=1e-4)
        fast = vitlab.accelerate(fused)
        with torch.autocast("cpu", torch.bfloat16):  # the training fast path (matmul attention under bf16)
            assert torch.allclose(fast(x).float(), ref, atol=0.1 * ref.abs().max())
    fused.train()(x).square().sum().backward()
    new = [n for n, p in fused.named_parameters() if any(k in n for k in ("ls1", "temperature", "score", "patch_embed.norm"))]
    assert new or kw.get("pool") == "seq"
    assert all(fused.get_parameter(n).grad.abs().sum() > 0 for n in new)


def test_lsa_masks_the_diagonal_and_learns_a_temperature_per_head():
    model = tiny(locality_attention=True).eval()
    attn = model.blocks[0].attn
    assert attn.temperature.shape == (4,) and torch.allclose(attn.temperature, torch.full((4,), 16 ** -0.5))
    w = attn.attention_weights(torch.randn(2, 65, 64))
    assert w.diagonal(dim1=-2, dim2=-1).abs().max() == 0 and torch.allclose(w.sum(-1), torch.ones(2, 4, 65))
    from vitlab.optim import build_optimizer, OptimConfig
    groups = build_optimizer(model, OptimConfig()).param_groups
    assert any(p is attn.temperature for g in groups if g["weight_decay"] == 0 for p in g["params"])


def test_spt_views_are_the_image_and_its_four_diagonal_shifts():
    from vitlab.models.vit import shifted_views
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 7, 9] = 1.0
    views = shifted_views(x, 2)
    assert views.shape == (1, 5, 16, 16)
    assert [tuple(v.nonzero()[0].tolist()) for v in views[0]] == [(7, 9), (9, 11), (9, 7), (5, 11), (5, 7)]
    model = tiny(shifted_patches=True)
    assert model.patch_embed.norm.normalized_shape == (5 * 3 * 16,) and model.forward_features(
        torch.randn(2, 3, 32, 32)).shape == (2, 65, 64)
    with pytest.raises(ValueError, match="shifted_patches and conv_stem"):
        vitlab.model_config("vit_mu4_32px", shifted_patches=True, conv_stem=(16, 32))


@pytest.mark.parametrize("kw,name", [({"locality_attention": True}, "locality_attention"),
                                     ({"pool": "seq", "class_token": False}, "pool='seq'"),
                                     ({"shifted_patches": True}, "shifted_patches"),
                                     ({"layer_scale": 0.1}, "layer_scale")])
def test_small_data_options_are_not_exported_where_no_format_holds_them(tmp_path, kw, name):
    from vitlab.interop import export_model
    with pytest.raises(ValueError, match=f"no official model has {name}"):
        export_model(tiny(**kw), tmp_path / "m.npz")
