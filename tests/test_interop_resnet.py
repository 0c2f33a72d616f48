"""Interop for the BiT ResNet and the ResNet+ViT hybrid: official / BiT .npz and timm state dicts.

The .npz files are synthesised by exporting randomly initialised vitlab models (no download);
numerics are compared with timm's own .npz loaders and timm models on the same input.
"""
import re
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vitlab
from helpers import randomise
from vitlab.cli import main
from vitlab.interop import export_model, import_model
from vitlab.models.resnet import standardize_weight

timm = pytest.importorskip("timm")
from timm.layers import HybridEmbed, StdConv2d, StdConv2dSame  # noqa: E402
from timm.models import resnetv2 as timm_resnetv2  # noqa: E402
from timm.models import vision_transformer as timm_vit  # noqa: E402


def images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return float((a - b).abs().max())


def assert_npz_equal(a, b):
    a, b = np.load(a, allow_pickle=False), np.load(b, allow_pickle=False)
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k


def tiny_bit(**kw):
    kw = {"layers": (1, 2), "stem_width": 32, "num_classes": 5, **kw}
    return randomise(vitlab.create_model("bit_r50x1", **kw))


def timm_bit(layers=(1, 2), stem=32, num_classes=5, eps=1e-8):
    """timm's BiT ResNetV2 (as ``_create_resnetv2_bit``) with a narrow stem."""
    return timm_resnetv2.ResNetV2(layers=list(layers), channels=tuple(4 * stem * 2**i for i in range(4)),
                                  stem_chs=stem, num_classes=num_classes, stem_type="fixed",
                                  conv_layer=partial(StdConv2d, eps=eps)).eval()


# Official numerics (tanh GELU, flax GroupNorm eps 1e-6, (w - mean) / (std + 1e-5)): what an import keeps.
OFFICIAL = dict(gelu="tanh", posemb_mode="scipy", gn_eps=1e-6, ws_eps=1e-5, ws_form="std")


def tiny_hybrid(layers=(2, 1), **kw):
    kw = {"image_size": 32, "resnet_layers": layers, "resnet_width": 32, "width": 32, "depth": 1, "mlp_dim": 64,
          "num_heads": 2, "num_classes": 3, "patch_size": 1 if layers else 2, **OFFICIAL, **kw}
    return randomise(vitlab.create_model("r50_vit_b16", **kw))


def timm_hybrid(layers=(2, 1), **kw):
    """timm's hybrid ViT (as ``vision_transformer_hybrid._resnetv2``) for ``tiny_hybrid``'s shapes."""
    conv = partial(StdConv2dSame, eps=1e-8)
    if layers:
        backbone = timm_resnetv2.ResNetV2(layers=list(layers), channels=(128, 256, 512, 1024), stem_chs=32,
                                          num_classes=0, global_pool="", preact=False, stem_type="same",
                                          conv_layer=conv)
    else:
        backbone = timm_resnetv2.create_resnetv2_stem(3, 32, stem_type="same", preact=False, conv_layer=conv)
    args = dict(img_size=32, patch_size=1 if layers else 2, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                num_classes=3, embed_layer=partial(HybridEmbed, backbone=backbone))
    return timm_vit.VisionTransformer(**{**args, **kw}).eval()


# --- BiT .npz (google-research/big_transfer) ----------------------------------------------
def test_bit_npz_round_trip_is_byte_exact_and_matches_timm_loader(tmp_path):
    src = export_model(tiny_bit(), tmp_path / "BiT-tiny.npz")
    names = np.load(src).files
    assert "resnet/block1/unit01/a/proj/standardized_conv2d/kernel" in names
    assert "resnet/block2/unit02/c/group_norm/gamma" in names and "resnet/head/conv2d/kernel" in names
    model, report = import_model(src)
    assert report.format == "bit" and report.num_tensors == len(names)
    assert (model.cfg.layers, model.cfg.stem_width, model.cfg.num_classes) == ((1, 2), 32, 5)
    assert (model.cfg.gn_eps, model.cfg.ws_eps) == (1e-5, 1e-10)  # bit_pytorch's numerics
    assert_npz_equal(src, export_model(model, tmp_path / "back.npz"))
    ref = timm_bit()
    timm_resnetv2._load_weights(ref, str(src), prefix="resnet/")  # maps a/group_norm to the norm before conv a
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-4
        assert model(x).abs().max() > 1  # the comparison is not between two near-zero outputs


def test_bit_width_factor_is_read_from_the_root_block(tmp_path):
    src = export_model(tiny_bit(layers=(1,), stem_width=64, width_factor=2), tmp_path / "x2.npz")
    model, _ = import_model(src)
    assert (model.cfg.width_factor, model.cfg.stem_width, model.cfg.widths) == (2, 64, (512,))


# --- official R50+ViT hybrid .npz -------------------------------------------------------
@pytest.mark.parametrize("layers", [(2, 1), ()])
def test_hybrid_npz_round_trip_is_byte_exact_and_matches_timm_loader(tmp_path, layers):
    ours = tiny_hybrid(layers)
    src = export_model(ours, tmp_path / "R-ViT.npz")
    names = np.load(src).files
    assert {"conv_root/kernel", "gn_root/scale", "embedding/kernel", "cls"} <= set(names)
    if layers:
        assert {"block1/unit1/conv_proj/kernel", "block1/unit2/gn3/scale", "block2/unit1/gn_proj/bias"} <= set(names)
    model, report = import_model(src)
    assert report.format == "official" and model.cfg == ours.cfg  # shapes and the official numerics
    assert_npz_equal(src, export_model(model, tmp_path / "back.npz"))
    # timm's loader, and our import with timm's numerics (GroupNorm eps 1e-5, sqrt(var + 1e-8)).
    ref = timm_hybrid(layers, act_layer=partial(nn.GELU, approximate="tanh"))
    timm_vit._load_weights(ref, str(src))
    as_timm, _ = import_model(src, gn_eps=1e-5, ws_eps=1e-8, ws_form="var")
    x = images()
    with torch.no_grad():
        assert max_diff(as_timm(x), ref(x)) <= 1e-4
        assert max_diff(model(x), ref(x)) > 0  # the official numerics differ from timm's port


def released_gn_shapes(src, dst):
    """``src`` with every GroupNorm scale and bias as (1, 1, 1, C), as in the released R50+ViT-B/16
    files (old ``flax.nn``; e.g. ``block1/unit1/gn1/scale``, ``gn_root/scale``, ``gn_proj/bias``)."""
    arrays = dict(np.load(src))
    gn = [k for k in arrays if re.search(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$", k)]  # vit_jax's _fix_groupnorm
    np.savez(dst, **{k: v.reshape(1, 1, 1, -1) if k in gn else v for k, v in arrays.items()})
    return dst, gn


def test_hybrid_npz_with_released_groupnorm_shapes_matches_timm_loader(tmp_path):
    ours = tiny_hybrid((2, 1, 1), image_size=64)  # unit 2 of stage 1 has no projection
    src, gn = released_gn_shapes(export_model(ours, tmp_path / "h.npz"), tmp_path / "R50+ViT-B_16.npz")
    assert {"gn_root/scale", "block1/unit1/gn1/scale", "block1/unit1/gn_proj/bias", "block1/unit2/gn3/bias"} <= set(gn)
    assert np.load(src)["block1/unit1/gn1/scale"].shape == (1, 1, 1, 32)
    model, report = import_model(src)
    assert report.num_tensors == len(ours.state_dict()) and model.cfg == ours.cfg
    for k, v in ours.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    ref = timm_hybrid((2, 1, 1), img_size=64, act_layer=partial(nn.GELU, approximate="tanh"))
    timm_vit._load_weights(ref, str(src))  # its _n2p flattens (1, 1, 1, C)
    as_timm, _ = import_model(src, gn_eps=1e-5, ws_eps=1e-8, ws_form="var")
    x = images(size=64)
    with torch.no_grad():
        assert max_diff(as_timm(x), ref(x)) <= 1e-4 and ref(x).abs().max() > 1
    back = np.load(export_model(model, tmp_path / "back.npz"))  # written as (C,), vit_jax's linen shape
    assert back["block1/unit1/gn1/scale"].shape == (32,)


def test_official_weight_standardisation_divides_by_std_plus_eps():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    flat = w.flatten(1)
    ref = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(standardize_weight(w, 1e-5, "std").flatten(1), ref, atol=1e-12)
    with pytest.raises(ValueError, match="ws_form"):
        vitlab.model_config("r50_vit_b16", ws_form="sqrt")


def test_hybrid_image_size_follows_the_position_embeddings(tmp_path):
    ours = tiny_hybrid((1, 1, 1), image_size=64)  # three stages: 16 px per token, a 4 x 4 grid
    model, _ = import_model(export_model(ours, tmp_path / "h.npz"))
    assert model.cfg.image_size == 64 and model.cfg.grid_size == (4, 4) and model.cfg.resnet_layers == (1, 1, 1)


# --- timm state dicts --------------------------------------------------------------------
def exported(model, tmp_path):
    """Export to a timm .safetensors file and read it back (what a timm user loads)."""
    return load_file(export_model(model, tmp_path / "timm.safetensors"))


def test_timm_bit_state_dict_in_and_out(tmp_path):
    ref = randomise(timm_bit())
    model, report = import_model(ref.state_dict())
    assert report.format == "timm" and (model.cfg.ws_eps, model.cfg.gn_eps) == (1e-8, 1e-5)
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
        fresh = timm_bit()
        fresh.load_state_dict(exported(model, tmp_path), strict=True)
        assert torch.equal(fresh(x), ref(x))


@pytest.mark.parametrize("layers", [(2, 1), ()])
def test_timm_hybrid_state_dict_in_and_out(tmp_path, layers):
    ref = randomise(timm_hybrid(layers))
    model, _ = import_model(ref.state_dict(), num_heads=2)
    assert (model.cfg.resnet_layers, model.cfg.image_size, model.cfg.gelu) == (layers, 32, "exact")
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
        fresh = timm_hybrid(layers)
        fresh.load_state_dict(exported(model, tmp_path), strict=True)
        assert torch.equal(fresh(x), ref(x))


# --- errors ------------------------------------------------------------------------------
def test_another_architecture_names_key_and_shapes(tmp_path):
    src = export_model(tiny_bit(), tmp_path / "bit.npz")
    like = vitlab.model_config("bit_r50x1", layers=(1, 2), stem_width=64, num_classes=5)
    with pytest.raises(ValueError, match=r"conv_root\.weight \(from resnet/root_block/standardized_conv2d/kernel\) "
                                         r"has shape \(32, 3, 7, 7\) in the bit checkpoint but \(64, 3, 7, 7\)"):
        import_model(src, like=like)
    with pytest.raises(ValueError, match="holds a BiTConfig checkpoint but .* is a HybridConfig"):
        import_model(src, like=vitlab.model_config("r50_vit_b16"))
    hybrid = timm_hybrid().state_dict()
    like = vitlab.model_config("r50_vit_b16", image_size=32, resnet_layers=(2, 1), resnet_width=64, width=32,
                               depth=1, mlp_dim=64, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match=r"patch_embed\.conv_root\.weight \(from patch_embed\.backbone\.stem\.conv"
                                         r"\.weight\) has shape \(32, 3, 7, 7\) .* but \(64, 3, 7, 7\)"):
        import_model(hybrid, like=like)
    del hybrid["patch_embed.backbone.stages.1.blocks.0.downsample.norm.bias"]
    with pytest.raises(ValueError, match=r"missing keys \[patch_embed\.backbone\.stages\.1\.blocks\.0\.downsample"):
        import_model(hybrid, num_heads=2)


def test_export_refuses_what_the_format_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="holds no BiT ResNet"):
        export_model(tiny_bit(), tmp_path / "hf")
    with pytest.raises(ValueError, match="only BiT ResNets"):
        export_model(tiny_hybrid(), tmp_path / "h.npz", "bit")
    with pytest.raises(ValueError, match="big_vision has no R50"):
        export_model(tiny_hybrid(), tmp_path / "h.npz", "big_vision")
    with pytest.raises(ValueError, match="Hugging Face folders for plain ViTs"):
        export_model(tiny_hybrid(), tmp_path / "hf")
    with pytest.raises(ValueError, match="32 groups; this model has num_groups=8"):
        export_model(tiny_bit(num_groups=8), tmp_path / "g8.npz")


def test_cli_convert_and_export_bit(tmp_path, capsys):
    src = export_model(tiny_bit(), tmp_path / "BiT.npz")
    assert main(["convert", str(src), str(tmp_path / "bit.safetensors"), "--model", "bit_r50x1"]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "bit.safetensors")]) == 0
    assert "bit checkpoint, 34 tensors mapped" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "bit.safetensors"), str(tmp_path / "back.npz")]) == 0
    assert_npz_equal(src, tmp_path / "back.npz")
