"""Interop: timm / Hugging Face / official / big_vision weights in and out, ONNX, safe loading.

Every model has random weights (no download); numerics are compared with the reference
implementations on the same input.
"""
import functools
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import vitlab
from helpers import randomise
from vitlab.cli import main
from vitlab.interop import export_model, export_onnx, import_model
from vitlab.models.posemb import sincos_2d
from vitlab.models.vit import vit_config

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402


def images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def small_timm(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)
    return randomise(TimmViT(**{**args, **kw}))


def max_diff(a, b):
    return float((a - b).abs().max())


# --- timm ------------------------------------------------------------------------------
def test_timm_state_dict_imports_and_exports_with_equal_logits(tmp_path):
    ref = small_timm()
    src = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file
    save_file(ref.state_dict(), src)
    model, report = import_model(src, num_heads=2)
    assert report.format == "timm" and report.num_tensors == len(ref.state_dict())
    assert model.cfg.gelu == "exact" and model.cfg.layer_norm_eps == 1e-6 and model.cfg.image_size == 32
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
        # Back to timm: a .pth that a fresh timm model loads (with weights_only) and that computes the same.
        out = export_model(model, tmp_path / "back.pth")
        fresh = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)
        fresh.load_state_dict(torch.load(out, weights_only=True))
        assert max_diff(fresh.eval()(x), ref(x)) == 0.0


def test_timm_layer_scale_model_imports_and_exports_with_equal_logits(tmp_path):
    ref = small_timm(init_values=0.1)  # timm's LayerScale: blocks.i.ls1.gamma / ls2.gamma
    torch.save(ref.state_dict(), tmp_path / "ls.pth")
    model, _ = import_model(tmp_path / "ls.pth", num_heads=2)
    assert model.cfg.layer_scale > 0
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
        fresh = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5,
                        init_values=1e-5)
        fresh.load_state_dict(torch.load(export_model(model, tmp_path / "back.pth"), weights_only=True))
        assert max_diff(fresh.eval()(x), ref(x)) == 0.0


def test_timm_gap_model_without_class_token(tmp_path):
    ref = small_timm(class_token=False, global_pool="avg", fc_norm=False)
    torch.save(ref.state_dict(), tmp_path / "gap.pth")
    model, _ = import_model(tmp_path / "gap.pth", num_heads=2)
    assert model.cfg.pool == "gap" and not model.cfg.class_token
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5


def test_timm_heads_are_guessed_from_the_paper_table(tmp_path):
    ref = randomise(TimmViT(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=2))
    torch.save(ref.state_dict(), tmp_path / "ti.pth")
    model, report = import_model(tmp_path / "ti.pth")
    assert model.cfg.num_heads == 3 and any("num_heads=3" in n for n in report.notes)
    with torch.no_grad():
        assert max_diff(model(images()), ref(images())) <= 1e-5


# --- Hugging Face ----------------------------------------------------------------------
def hf_config(**kw):
    transformers = pytest.importorskip("transformers")
    args = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
                patch_size=8, num_labels=4)
    return transformers, transformers.ViTConfig(**{**args, **kw})


def test_hf_classification_folder_imports_and_exports(tmp_path):
    transformers, config = hf_config(id2label={0: "cat", 1: "dog", 2: "emu", 3: "yak"})
    ref = randomise(transformers.ViTForImageClassification(config))
    ref.save_pretrained(tmp_path / "hf")
    model, report = import_model(tmp_path / "hf")
    assert report.format == "hf" and report.class_names == ["cat", "dog", "emu", "yak"]
    assert model.cfg.layer_norm_eps == 1e-12 and model.cfg.gelu == "exact" and model.cfg.num_classes == 4
    x = images()
    with torch.no_grad():
        want = ref(pixel_values=x).logits
        assert max_diff(model(x), want) <= 1e-5
        export_model(model, tmp_path / "back", class_names=report.class_names)
        back = transformers.ViTForImageClassification.from_pretrained(tmp_path / "back").eval()
        assert max_diff(back(pixel_values=x).logits, want) <= 1e-5
    assert back.config.id2label[2] == "emu" and back.config.layer_norm_eps == 1e-12


def test_hf_vit_model_features_and_pooler(tmp_path):
    transformers, config = hf_config(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    ref = randomise(transformers.ViTModel(config))
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text('{"image_mean": [0.485, 0.456, 0.406], '
                                                              '"image_std": [0.229, 0.224, 0.225]}')
    model, _ = import_model(tmp_path / "hf")
    assert model.cfg.gelu == "tanh" and model.cfg.mean == (0.485, 0.456, 0.406)
    assert model.cfg.representation_size == 64 and model.cfg.num_classes == 0  # the pooler
    x = images()
    with torch.no_grad():
        out = ref(pixel_values=x)
        assert max_diff(model.forward_features(x), out.last_hidden_state) <= 1e-5
        assert max_diff(model(x), out.pooler_output) <= 1e-5
        export_model(model, tmp_path / "back")  # no head: a ViTModel whose pooler is the representation layer
        back = transformers.ViTModel.from_pretrained(tmp_path / "back").eval()
        again = back(pixel_values=x)
        assert max_diff(again.pooler_output, out.pooler_output) <= 1e-5
        assert max_diff(again.last_hidden_state, out.last_hidden_state) <= 1e-5
    assert back.config.hidden_act == "gelu_pytorch_tanh" and back.config.layer_norm_eps == 1e-6


# --- official and big_vision .npz ------------------------------------------------------
def official_arrays(width=32, depth=2, heads=2, mlp=64, patch=8, grid=4, classes=5, rep=None, cls=True,
                    flavour="official", seed=0, map_head=False):
    """Random arrays named and shaped as in the released .npz files (``map_head``: big_vision's
    ``pool_type="map"``)."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.2  # noqa: E731
    names = dict(official=("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
                 big_vision=("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))[flavour]
    a = {"embedding/kernel": r(patch, patch, 3, width), "embedding/bias": r(width)}
    if cls:
        a["cls"] = r(1, 1, width)
    if flavour == "official":
        a["Transformer/posembed_input/pos_embedding"] = r(1, grid * grid + cls, width)
    else:
        a["pos_embedding"] = r(1, grid * grid, width)
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        att = b + names[0] + "/"
        for ln in ("LayerNorm_0", names[1]):
            a[f"{b}{ln}/scale"], a[f"{b}{ln}/bias"] = 1 + r(width), r(width)
        for n in ("query", "key", "value"):
            a[f"{att}{n}/kernel"], a[f"{att}{n}/bias"] = r(width, heads, width // heads), r(heads, width // heads)
        a[f"{att}out/kernel"], a[f"{att}out/bias"] = r(heads, width // heads, width), r(width)
        a[f"{b}{names[2]}/Dense_0/kernel"], a[f"{b}{names[2]}/Dense_0/bias"] = r(width, mlp), r(mlp)
        a[f"{b}{names[2]}/Dense_1/kernel"], a[f"{b}{names[2]}/Dense_1/bias"] = r(mlp, width), r(width)
    a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"] = 1 + r(width), r(width)
    if map_head:  # big_vision models/vit.py MAPHead: probe, attention, LayerNorm, MlpBlock
        att = "MAPHead_0/MultiHeadDotProductAttention_0/"
        a["MAPHead_0/probe"] = r(1, 1, width)
        for n in ("query", "key", "value"):
            a[f"{att}{n}/kernel"], a[f"{att}{n}/bias"] = r(width, heads, width // heads), r(heads, width // heads)
        a[f"{att}out/kernel"], a[f"{att}out/bias"] = r(heads, width // heads, width), r(width)
        a["MAPHead_0/LayerNorm_0/scale"], a["MAPHead_0/LayerNorm_0/bias"] = 1 + r(width), r(width)
        a["MAPHead_0/MlpBlock_0/Dense_0/kernel"], a["MAPHead_0/MlpBlock_0/Dense_0/bias"] = r(width, mlp), r(mlp)
        a["MAPHead_0/MlpBlock_0/Dense_1/kernel"], a["MAPHead_0/MlpBlock_0/Dense_1/bias"] = r(mlp, width), r(width)
    if rep:
        a["pre_logits/kernel"], a["pre_logits/bias"] = r(width, rep), r(rep)
    a["head/kernel"], a["head/bias"] = r(rep or width, classes), r(classes)
    if flavour == "big_vision":
        a = {f"params/{k}": v for k, v in a.items()}
    return a


def timm_jax_reference(path, **kw):
    """timm's own loader for the JAX .npz files, with the JAX numerics (tanh GELU)."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5,
                act_layer=functools.partial(nn.GELU, approximate="tanh"))
    ref = TimmViT(**{**args, **kw}).eval()
    ref.load_pretrained(str(path))
    return ref


def assert_npz_equal(a, b):
    a, b = np.load(a, allow_pickle=False), np.load(b, allow_pickle=False)
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k


def test_official_npz_matches_timm_loader_and_round_trips_exactly(tmp_path):
    src = tmp_path / "ViT-mini.npz"
    np.savez(src, **official_arrays())
    model, report = import_model(src)
    assert report.format == "official" and model.cfg.gelu == "tanh" and model.cfg.mean == (0.5, 0.5, 0.5)
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), timm_jax_reference(src)(x)) <= 1e-5
    assert_npz_equal(src, export_model(model, tmp_path / "back.npz"))


def test_official_imagenet21k_file_with_representation_layer(tmp_path):
    arrays = official_arrays(rep=48, classes=21843)
    np.savez(tmp_path / "i21k.npz", **arrays)
    model, _ = import_model(tmp_path / "i21k.npz")
    assert model.cfg.representation_size == 48 and model.cfg.num_classes == 21843
    x = images(1)
    with torch.no_grad():
        pooled = model.pool(model.forward_features(x)).numpy()
        pre = np.tanh(pooled @ arrays["pre_logits/kernel"] + arrays["pre_logits/bias"])
        logits = pre @ arrays["head/kernel"] + arrays["head/bias"]
        assert np.abs(model(x).numpy() - logits).max() <= 1e-4
    assert_npz_equal(tmp_path / "i21k.npz", export_model(model, tmp_path / "back.npz"))


def test_official_384px_file_with_577_position_embeddings(tmp_path):
    np.savez(tmp_path / "384.npz", **official_arrays(width=16, depth=1, patch=16, grid=24, classes=3))
    model, _ = import_model(tmp_path / "384.npz")
    assert model.cfg.image_size == 384 and model.pos_embed.shape == (1, 577, 16)
    assert model(images(1, 384)).shape == (1, 3)
    assert_npz_equal(tmp_path / "384.npz", export_model(model, tmp_path / "back.npz"))


@pytest.mark.parametrize("cls", [True, False])
def test_big_vision_naming(tmp_path, cls):
    src = tmp_path / "bv.npz"
    np.savez(src, **official_arrays(flavour="big_vision", cls=cls))
    model, report = import_model(src)
    assert report.format == "big_vision" and model.cfg.pool == ("token" if cls else "gap")
    ref = timm_jax_reference(src, class_token=cls, no_embed_class=True, global_pool="token" if cls else "avg",
                             fc_norm=False)
    with torch.no_grad():
        assert max_diff(model(images()), ref(images())) <= 1e-5
    assert_npz_equal(src, export_model(model, tmp_path / "back.npz", "big_vision"))


def test_vitlab_model_to_official_and_back_is_exact(tmp_path):
    model = randomise(vitlab.create_model("vit_mu4_32px", depth=2, width=32, mlp_dim=64, num_heads=2,
                                          representation_size=24, gelu="tanh", posemb_mode="scipy"))
    back, _ = import_model(export_model(model, tmp_path / "m.npz"))
    assert back.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# --- errors and safety -----------------------------------------------------------------
def test_checkpoint_of_another_architecture_names_key_and_shapes(tmp_path):
    torch.save(small_timm().state_dict(), tmp_path / "w64.pth")
    like = vit_config("Mu/8", image_size=32, width=32, depth=2, mlp_dim=128, num_heads=2, num_classes=5)
    with pytest.raises(ValueError, match=r"cls_token .*\(1, 1, 64\) in the timm checkpoint but \(1, 1, 32\) in "):
        import_model(tmp_path / "w64.pth", like=like)
    arrays = official_arrays()
    arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"] = np.zeros((32, 96), np.float32)
    np.savez(tmp_path / "odd.npz", **arrays)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight \(from .*MlpBlock_3/Dense_0/kernel\) "
                                         r"has shape \(96, 32\).*\(64, 32\)"):
        import_model(tmp_path / "odd.npz")


def test_wrong_format_and_unexpected_keys_are_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(2, 8)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"not a timm VisionTransformer state dict.*patch_embed\.proj\.weight"):
        import_model(tmp_path / "resnet.pth")
    state = small_timm().state_dict()
    state["dist_token"] = torch.zeros(1, 1, 64)
    torch.save(state, tmp_path / "deit.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \[dist_token\]"):
        import_model(tmp_path / "deit.pth", num_heads=2)
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not an official or big_vision"):
        import_model(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="cannot tell the format"):
        (tmp_path / "w.txt").write_text("hi")
        import_model(tmp_path / "w.txt")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file if unpickled


@pytest.mark.parametrize("name", ["evil.pth", "hf/pytorch_model.bin"])
def test_malicious_pickle_is_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    if name.startswith("hf/"):
        (path.parent / "config.json").write_text('{"model_type": "vit"}')
    with open(path, "wb") as f:
        pickle.dump({"patch_embed.proj.weight": Payload(marker)}, f, protocol=2)
    with pytest.raises(ValueError, match="refused to load .*never executes pickled code"):
        import_model(path)
    assert not marker.exists()
    bad = tmp_path / "obj.npz"
    np.savez(bad, a=np.array([Payload(marker)], dtype=object))
    with pytest.raises(ValueError, match="not a readable .npz"):
        import_model(bad)
    assert not marker.exists()


def test_export_refuses_what_the_format_cannot_express(tmp_path):
    model = vitlab.create_model("vit_mu4_32px", depth=1, width=32, mlp_dim=64, num_heads=2, representation_size=16)
    with pytest.raises(ValueError, match="no representation layer"):
        export_model(model, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="no representation layer"):
        export_model(model, tmp_path / "hf")
    gap = vitlab.create_model("vit_mu4_32px", depth=1, width=32, mlp_dim=64, num_heads=2, pool="gap")
    with pytest.raises(ValueError, match="pool='gap'"):
        export_model(gap, tmp_path / "g.npz")


# --- ONNX and the CLI ------------------------------------------------------------------
def test_onnx_export_dynamic_batch_and_size(tmp_path):
    pytest.importorskip("onnxruntime")
    model = randomise(vitlab.create_model("vit_mu4_32px", depth=1, width=32, mlp_dim=64, num_heads=2, num_classes=3))
    diff = export_onnx(model, tmp_path / "m.onnx", dynamic_batch=True, dynamic_size=True)
    assert diff <= 1e-4 and (tmp_path / "m.onnx").stat().st_size > 0


def test_onnx_dynamic_size_recomputes_sincos_table_and_runs_map_head(tmp_path):
    pytest.importorskip("onnxruntime")
    model = randomise(vitlab.create_model("vit_mu4_32px", depth=1, width=32, mlp_dim=64, num_heads=2, pool="map",
                                          class_token=False, posemb="sincos2d"))
    assert export_onnx(model, tmp_path / "m.onnx", dynamic_batch=True, dynamic_size=True) <= 1e-4


def test_cli_convert_and_export(tmp_path, capsys):
    src = tmp_path / "ViT-mini.npz"
    np.savez(src, **official_arrays())
    assert main(["convert", str(src), str(tmp_path / "m.safetensors")]) == 0
    assert "official checkpoint" in capsys.readouterr().out
    loaded = vitlab.load_model(tmp_path / "m.safetensors")
    assert loaded.config.gelu == "tanh" and loaded.meta["format"] == "official"
    assert main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "back.npz")]) == 0
    assert_npz_equal(src, tmp_path / "back.npz")
    assert main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "m.onnx"), "--dynamic-batch"]) == 0
    assert "max abs diff" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "nope.npz"), str(tmp_path / "x.safetensors")]) == 2
    torch.save(small_timm().state_dict(), tmp_path / "t.pth")
    assert main(["convert", str(tmp_path / "t.pth"), str(tmp_path / "t.safetensors"), "--from", "timm",
                 "--num-heads", "2", "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]) == 0
    assert vitlab.load_model(tmp_path / "t.safetensors").config.std == (0.229, 0.224, 0.225)
    assert main(["convert", str(src), str(tmp_path / "b16.safetensors"), "--model", "vit_b16"]) == 2
    assert "patch_embed.proj.weight (from embedding/kernel) has shape (32, 3, 8, 8)" in capsys.readouterr().err


def test_hf_sharded_folder(tmp_path):
    transformers, config = hf_config()
    ref = randomise(transformers.ViTForImageClassification(config))
    ref.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model, _ = import_model(tmp_path / "hf")
    with torch.no_grad():
        assert max_diff(model(images()), ref(pixel_values=images()).logits) <= 1e-5


def test_big_vision_scanned_blocks_and_sincos_posemb(tmp_path):
    arrays = official_arrays(flavour="big_vision", cls=False)
    np.savez(tmp_path / "plain.npz", **arrays)
    block = "params/Transformer/encoderblock_"
    scanned = {k: v for k, v in arrays.items() if not k.startswith(block)}
    for k in [k for k in arrays if k.startswith(block + "0/")]:
        second = arrays[k.replace("encoderblock_0/", "encoderblock_1/")]
        scanned[k.replace("encoderblock_0/", "encoderblock/")] = np.stack([arrays[k], second])
    np.savez(tmp_path / "scanned.npz", **scanned)
    plain, _ = import_model(tmp_path / "plain.npz")
    model, report = import_model(tmp_path / "scanned.npz")
    assert any("scanned" in n for n in report.notes)
    for k, v in plain.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    del scanned["params/pos_embedding"]
    np.savez(tmp_path / "sincos.npz", **scanned)
    model, report = import_model(tmp_path / "sincos.npz", image_size=48)
    assert model.cfg.image_size == 48 and any("sincos2d" in n for n in report.notes)
    assert torch.equal(model.pos_embed[0], sincos_2d((6, 6), 32))


# --- big_vision variants: the MAP head and sin-cos position embeddings -------------------
@pytest.mark.parametrize("cls", [False, True])
def test_timm_map_head_state_dict_in_and_out(tmp_path, cls):
    ref = small_timm(class_token=cls, global_pool="map")
    model, report = import_model(ref.state_dict(), num_heads=2)
    assert (model.cfg.pool, model.cfg.class_token) == ("map", cls) and report.num_tensors == len(ref.state_dict())
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
        fresh = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5,
                        class_token=cls, global_pool="map")
        fresh.load_state_dict(torch.load(export_model(model, tmp_path / "map.pth"), weights_only=True))
        assert torch.equal(fresh.eval()(x), ref(x))


def test_big_vision_map_head_matches_timm_loader_and_round_trips(tmp_path):
    src = tmp_path / "map.npz"
    arrays = official_arrays(flavour="big_vision", cls=False, map_head=True)
    np.savez(src, **arrays)
    model, report = import_model(src)
    assert model.cfg.pool == "map" and report.num_tensors == len(model.state_dict())
    ref = timm_jax_reference(src, class_token=False, no_embed_class=True, global_pool="map")
    x = images()
    with torch.no_grad():
        out = model(x)
        assert max_diff(out, ref(x)) <= 1e-5
        assert max_diff(out, model.head(model.forward_features(x).mean(1))) > 0.1  # the head is not a mean
    assert_npz_equal(src, export_model(model, tmp_path / "back.npz", "big_vision"))
    with pytest.raises(ValueError, match="no MAP head"):
        export_model(model, tmp_path / "official.npz")


def big_vision_sincos(h, w, width, temperature=10_000.0):
    """big_vision's ``posemb_sincos_2d`` (models/vit.py), in numpy: (1, h*w, width)."""
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y, x = np.einsum("m,d->md", y.flatten(), omega), np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


@pytest.mark.parametrize("cls", [False, True])
def test_big_vision_sincos_file_has_no_pos_embedding_in_or_out(tmp_path, cls):
    arrays = official_arrays(flavour="big_vision", cls=cls)
    del arrays["params/pos_embedding"]  # posemb="sincos2d" is computed, not a parameter
    np.savez(tmp_path / "sincos.npz", **arrays)
    model, _ = import_model(tmp_path / "sincos.npz", image_size=32)
    assert model.cfg.posemb == "sincos2d" and "pos_embed" not in dict(model.named_parameters())
    # big_vision's merge_params refuses a pos_embedding its model does not have: none is written.
    back = export_model(model, tmp_path / "back.npz", "big_vision")
    assert_npz_equal(tmp_path / "sincos.npz", back)
    # timm's ViT learns its position embeddings and its loader needs the array: give it big_vision's table.
    np.savez(tmp_path / "table.npz", **arrays, **{"params/pos_embedding": big_vision_sincos(4, 4, 32)})
    ref = timm_jax_reference(tmp_path / "table.npz", class_token=cls, no_embed_class=True,
                             global_pool="token" if cls else "avg", fc_norm=False)
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
        assert max_diff(import_model(back, image_size=32)[0](x), model(x)) == 0.0


def test_vitlab_sincos_model_to_big_vision_and_timm(tmp_path):
    model = randomise(vitlab.create_model("vit_mu4_32px", depth=2, width=32, mlp_dim=64, num_heads=2, pool="gap",
                                          class_token=False, posemb="sincos2d", gelu="tanh", posemb_mode="scipy"))
    src = export_model(model, tmp_path / "bv.npz", "big_vision")
    assert "params/pos_embedding" not in np.load(src).files
    back, _ = import_model(src, image_size=32)
    assert back.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = images()
    with torch.no_grad():  # timm learns the table: a timm state dict holds it as pos_embed
        ref = TimmViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10,
                      class_token=False, global_pool="avg", fc_norm=False,
                      act_layer=functools.partial(nn.GELU, approximate="tanh"))
        ref.load_state_dict(torch.load(export_model(model, tmp_path / "t.pth"), weights_only=True))
        assert max_diff(ref.eval()(x), model(x)) <= 1e-5
        model.set_image_size(48)  # the table is recomputed, not resampled
        assert torch.equal(model.pos_embed[0], sincos_2d((12, 12), 32))


def test_corrupt_and_vitlab_files_get_clear_errors(tmp_path):
    good = tmp_path / "t.pth"
    torch.save(small_timm().state_dict(), good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        import_model(tmp_path / "cut.pth")
    mine = vitlab.save_model(vitlab.create_model("vit_mu4_32px", depth=1), tmp_path / "mine.safetensors")
    with pytest.raises(ValueError, match="already a vitlab model file"):
        import_model(mine)
