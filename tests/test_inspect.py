import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vitlab
from vitlab.cli import main
from vitlab.inspect import (attention_distance, attention_maps, attention_modules, attention_rollout,
                            capture_attention, embedding_filters, mean_attention_distance, plot_attention,
                            plot_attention_distance, plot_embedding_filters, plot_posemb_similarity,
                            posemb_similarity, token_grid, token_map)
from vitlab.models.posemb import sincos_2d


def tiny(**overrides):
    cfg = dict(depth=2, width=32, mlp_dim=64, num_heads=2, num_classes=3)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = vitlab.create_model("vit_mu4_32px", **cfg).eval()
    nn.init.normal_(model.head.weight)  # non-zero logits, so equality checks mean something
    return model


def brute_force_uniform_distance(rows, cols, cell):
    """Mean over all (query, key) patch pairs of the pixel distance between their centres."""
    centres = [((i + 0.5) * cell, (j + 0.5) * cell) for i in range(rows) for j in range(cols)]
    total = sum(math.dist(a, b) for a, b in itertools.product(centres, centres))
    return total / len(centres) ** 2


# --- capture -------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_capture_leaves_logits_bit_identical(fused):
    model = tiny(fused_attention=fused)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        with capture_attention(model) as maps:
            during = model(x)
        after = model(x)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 65, 65) and maps[0].dtype == torch.float32
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 2, 65))
    assert all(not m._forward_pre_hooks for m in attention_modules(model))


def test_captured_weights_are_the_explicit_paths_weights():
    model = tiny(fused_attention=False)
    inner = []
    handle = model.blocks[1].attn.attn_drop.register_forward_hook(lambda m, args, out: inner.append(out))
    with torch.no_grad(), capture_attention(model) as maps:
        model(torch.randn(2, 3, 32, 32))
    handle.remove()
    assert torch.equal(maps[1], inner[0])
    assert not torch.allclose(maps[0], maps[1])


def test_captured_weights_equal_timms_attention_on_the_same_weights():
    timm = pytest.importorskip("timm")
    model = tiny()
    ref = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2,
                                                           num_heads=2, mlp_ratio=2, num_classes=3).eval()
    ref.load_state_dict(model.state_dict())
    inner = []
    for block in ref.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, args, out: inner.append(out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), capture_attention(model) as maps:
        torch.testing.assert_close(model(x), ref(x))
    assert len(maps) == len(inner) == 2
    for ours, theirs in zip(maps, inner):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_capture_with_grad_bf16_autocast_and_bf16_weights():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    with capture_attention(model) as maps:  # grad mode: weights come back detached
        model(x).sum().backward()
    assert not maps[0].requires_grad and model.blocks[0].attn.qkv.weight.grad is not None
    reference = maps[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x)
        with capture_attention(model) as maps:
            captured = model(x)
    assert torch.equal(plain, captured) and maps[0].dtype == torch.float32
    torch.testing.assert_close(maps[0], reference, atol=0.02, rtol=0)
    model = model.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        plain = model(xb)
        with capture_attention(model) as maps:
            captured = model(xb)
    assert torch.equal(plain, captured) and maps[0].dtype == torch.float32
    torch.testing.assert_close(maps[0], reference, atol=0.02, rtol=0)


def test_capture_removes_hooks_on_error_and_finds_nested_attention():
    model = tiny()
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(model):
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in attention_modules(model))
    wrapped = nn.Sequential(nn.Identity(), nn.ModuleDict({"vit": model}))  # any attribute path
    with torch.no_grad(), capture_attention(wrapped) as maps:
        model(torch.randn(1, 3, 32, 32))
    assert len(maps) == 2
    with pytest.raises(ValueError, match="no vitlab Attention"):
        with capture_attention(nn.Linear(2, 2)):
            pass


# --- rollout -------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion,discard", [("mean", 0.0), ("max", 0.5), ("min", 0.9)])
def test_rollout_of_identity_layers_is_identity(fusion, discard):
    eye = torch.eye(10).expand(2, 3, 10, 10)
    out = attention_rollout([eye] * 4, head_fusion=fusion, discard_ratio=discard)
    torch.testing.assert_close(out, torch.eye(10).expand(2, 10, 10), atol=0, rtol=0)


def test_rollout_matches_a_direct_product():
    torch.manual_seed(0)
    maps = [torch.rand(2, 3, 6, 6).softmax(-1) for _ in range(3)]
    for start in (0, 1):
        expected = []
        for b in range(2):
            r = np.eye(6)
            for attn in maps[start:]:
                a = attn[b].double().numpy().mean(axis=0) + np.eye(6)
                r = (a / a.sum(axis=1, keepdims=True)) @ r
            expected.append(r)
        out = attention_rollout(maps, start_layer=start)
        np.testing.assert_allclose(out.numpy(), np.stack(expected), atol=1e-6)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 6))
    # discard ratio 0.5 on 6 keys: the 3 smallest weights of each row are gone before the identity
    one = attention_rollout(maps[:1], head_fusion="max", discard_ratio=0.5)
    fused = maps[0].amax(1)
    dropped = fused < fused.sort(-1).values[..., 3:4]
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert torch.all(one[dropped & off_diagonal] == 0) and torch.all(one[~dropped] > 0)


def test_rollout_rejects_bad_options():
    maps = [torch.rand(1, 2, 5, 5)]
    with pytest.raises(ValueError, match="start layer 1"):
        attention_rollout(maps, start_layer=1)
    with pytest.raises(ValueError, match="discard ratio"):
        attention_rollout(maps, discard_ratio=1.0)
    with pytest.raises(ValueError, match="head fusion"):
        attention_rollout(maps, head_fusion="median")


def test_token_map_reads_class_row_or_mean_of_patch_rows():
    m = torch.arange(25.0).reshape(5, 5)
    assert token_map(m, num_prefix_tokens=1, pool="token").tolist() == [1, 2, 3, 4]
    assert token_map(m, num_prefix_tokens=1, pool="gap").tolist() == m[1:, 1:].mean(0).tolist()
    assert token_map(m[1:, 1:], num_prefix_tokens=0, pool="gap").tolist() == m[1:, 1:].mean(0).tolist()
    assert token_grid(12, (96, 128)) == (3, 4)


def test_attention_maps_for_gap_model_without_class_token():
    model = tiny(pool="gap", class_token=False)
    rollout, heads, logits = attention_maps(model, torch.randn(3, 3, 32, 32), batch_size=2)
    assert rollout.shape == (3, 8, 8) and heads.shape == (3, 2, 8, 8) and logits.shape == (3, 3)
    torch.testing.assert_close(rollout.sum((-2, -1)), torch.ones(3))  # mean of stochastic rows


# --- mean attention distance ---------------------------------------------------------------
@pytest.mark.parametrize("grid,prefix", [((4, 4), 1), ((3, 5), 0)])
def test_attention_distance_identity_is_zero_uniform_is_analytic(grid, prefix):
    n = prefix + grid[0] * grid[1]
    eye = torch.eye(n).expand(2, 3, n, n)
    assert torch.equal(attention_distance(eye, grid=grid, cell=(16, 16), num_prefix_tokens=prefix), torch.zeros(2, 3))
    uniform = torch.full((2, 3, n, n), 1.0 / n)
    out = attention_distance(uniform, grid=grid, cell=(16, 16), num_prefix_tokens=prefix)
    expected = brute_force_uniform_distance(*grid, 16)
    torch.testing.assert_close(out, torch.full((2, 3), expected))


def test_mean_attention_distance_of_a_model_with_uniform_attention():
    model = tiny(depth=3)
    for attn in attention_modules(model):
        nn.init.zeros_(attn.qkv.weight)
        nn.init.zeros_(attn.qkv.bias)  # q = k = 0: every query attends uniformly
    dist = mean_attention_distance(model, torch.randn(5, 3, 32, 32), batch_size=2)
    assert dist.shape == (3, 2)
    torch.testing.assert_close(dist, torch.full((3, 2), brute_force_uniform_distance(8, 8, 4)))


# --- embeddings ----------------------------------------------------------------------------
def test_sincos_similarity_peaks_on_its_own_position():
    grid = (6, 7)
    table = torch.cat([torch.randn(1, 64), sincos_2d(grid, 64)])  # a class token in front
    sim = posemb_similarity(table[None], grid, num_prefix_tokens=1)
    assert sim.shape == (6, 7, 6, 7)
    for i, j in itertools.product(range(6), range(7)):
        tile = sim[i, j]
        assert tile[i, j] == pytest.approx(1.0, abs=1e-5)
        assert divmod(int(tile.argmax()), 7) == (i, j)
        assert (tile < tile[i, j] - 1e-4).sum() == 6 * 7 - 1  # a strict peak
    with pytest.raises(ValueError, match="do not fill"):
        posemb_similarity(table, (6, 6))


def test_embedding_filters_recover_the_main_directions():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(48, 48))[0].T  # orthonormal rows
    coeffs = torch.randn(64, 3) * torch.tensor([10.0, 5.0, 2.0])
    weight = (coeffs @ basis[:3] + 0.01 * torch.randn(64, 48)).reshape(64, 3, 4, 4)
    filters = embedding_filters(weight)
    assert filters.shape == (28, 3, 4, 4)
    for k in range(3):
        assert abs(float(filters[k].flatten() @ basis[k])) == pytest.approx(1.0, abs=1e-3)
    assert embedding_filters(weight[:5]).shape == (4, 3, 4, 4)  # at most D - 1 components


# --- figures and CLI -----------------------------------------------------------------------
def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def test_each_figure_is_a_png_of_the_requested_size(tmp_path):
    rgb = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    size = (333, 257)
    paths = [
        plot_attention(rgb, torch.rand(8, 8), torch.rand(3, 8, 8), tmp_path / "a.png", title="t", size=size),
        plot_posemb_similarity(torch.rand(5, 6, 5, 6) * 2 - 1, tmp_path / "p.png", size=size),
        plot_attention_distance(torch.rand(4, 3) * 20, tmp_path / "d.png", uniform=12.0, num_images=7, size=size),
        plot_embedding_filters(torch.randn(10, 3, 4, 4), tmp_path / "f.png", size=size),
    ]
    assert [png_size(p) for p in paths] == [size] * 4
    assert png_size(plot_attention(rgb, torch.rand(8, 8), torch.rand(12, 8, 8), tmp_path / "b.png")) == (1020, 3 * 180 + 30)  # 6 columns; image row + 2 head rows


def write_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return folder


def test_cli_writes_the_report(tmp_path, capsys):
    ckpt = vitlab.save_model(tiny(), tmp_path / "m.safetensors", class_names=["cat", "dog", "eel"],
                             meta={"top1": 0.625, "preset": "vit_mu4_32px"})
    images = write_images(tmp_path / "images", [(40, 50), (32, 32)])
    out = tmp_path / "out"
    assert main(["inspect", str(ckpt), "--images", str(images), "--out", str(out), "--head-fusion", "max",
                 "--discard-ratio", "0.5", "--start-layer", "1"]) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["attention_000_img0.png", "attention_001_img1.png", "attention_distance.png",
                    "embedding_filters.png", "posemb_similarity.png"]
    assert all(png_size(out / p)[0] > 100 for p in pngs)
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 5 and "<img src=\"out" not in report
    assert "vit_mu4_32px" in report and "0.6250" in report and "20,931" in report and "32x32" in report and "cat, dog, eel" in report


def test_cli_gap_model_with_data_folder_and_errors(tmp_path, capsys):
    ckpt = vitlab.save_model(tiny(pool="gap", class_token=False, depth=1), tmp_path / "gap.safetensors")
    images = write_images(tmp_path / "images", [(32, 32)])
    data = write_images(tmp_path / "data" / "class_a", [(36, 36), (32, 48), (64, 32)]).parent
    out = tmp_path / "out"
    assert main(["inspect", str(ckpt), "--images", str(images / "img0.jpg"), "--data", str(data), "--out", str(out),
                 "--num-images", "2"]) == 0
    assert "over 2 images" in (out / "report.html").read_text()
    capsys.readouterr()
    assert main(["inspect", str(ckpt), "--images", str(tmp_path / "nope.png"), "--out", str(out)]) == 2
    assert "nope.png does not exist" in capsys.readouterr().err
    assert main(["inspect", str(ckpt), "--images", str(images), "--out", str(out), "--device", "gpu0"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert main(["inspect", str(ckpt), "--images", str(images), "--out", str(out), "--start-layer", "3"]) == 2
    assert "start layer 3" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["inspect", str(ckpt), "--images", str(tmp_path / "bad.png"), "--out", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err
