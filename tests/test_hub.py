"""Pretrained models by name: catalog, cache, downloads from loopback servers, offline use, import, CLI."""
from __future__ import annotations

import hashlib
import os
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from helpers import randomise
from hub_servers import serve
from vitlab.cli import main
from vitlab.hub import cache
from vitlab.interop import export_model, import_model

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def entry(source: dict, fmt: str, **extra) -> dict:
    return {"architecture": "vit_mu4_32px", "source": source, "format": fmt, "image_size": 32, "num_classes": 10,
            "labels": "cifar10", "license": "Apache-2.0", "size": None, "sha256": None, "accuracy": None,
            "preprocess": {"crop_pct": 1.0, "interpolation": "bilinear", "resize": "squash",
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            "description": "a tiny test model", **extra}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A bucket server and a Hugging Face endpoint on 127.0.0.1 holding a tiny ViT in each released layout,
    a catalog naming them (VITLAB_CATALOG), and empty caches."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants as hf_constants
    model = randomise(vitlab.create_model("vit_mu4_32px", gelu="tanh"))  # the JAX files' GELU
    bucket, hf_root = tmp_path / "bucket", tmp_path / "hf_root"
    npz = export_model(model, bucket / "vit_models" / "test" / "Mu_4.npz")
    export_model(model, hf_root / "test-org" / "mu4")  # a transformers folder
    export_model(model, hf_root / "test-org" / "mu4-unlisted")  # one the catalog does not name
    timm_dir = hf_root / "test-org" / "mu4-timm"
    timm_dir.mkdir(parents=True)
    export_model(model, timm_dir / "model.safetensors", "timm")
    (timm_dir / "config.json").write_text(json.dumps({
        "architecture": "vit_mu4", "num_classes": 10, "label_names": [f"timm class {i}" for i in range(10)],
        "pretrained_cfg": {"input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bicubic",
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    sha = hashlib.sha256(npz.read_bytes()).hexdigest()
    gcs = {"gcs": "vit_models/test/Mu_4.npz"}
    catalog = {"defaults": {"vit_mu4_32px": "test_gcs"}, "models": {
        "vit_mu4_32px.test_gcs": entry(gcs, "official"),
        "vit_mu4_32px.test_sha": entry(gcs, "official", sha256=sha, size=npz.stat().st_size),
        "vit_mu4_32px.test_badsha": entry(gcs, "official", sha256="0" * 64),
        "vit_mu4_32px.test_truncated": entry(gcs, "official", size=npz.stat().st_size + 1000),  # the server's is short
        "vit_mu4_32px.test_hf": entry({"hf": "test-org/mu4", "revision": "main",
                                       "files": ["config.json", "model.safetensors"]}, "hf"),
        "vit_mu4_32px.test_timm": entry({"hf": "test-org/mu4-timm", "revision": "main"}, "timm", labels=None),
    }}
    (tmp_path / "catalog.json").write_text(json.dumps(catalog))
    for var in ("VITLAB_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VITLAB_CATALOG", str(tmp_path / "catalog.json"))
    with serve(bucket, "gcs") as (gcs_url, faults), serve(hf_root, "hf") as (hf_url, hf_faults):
        monkeypatch.setenv("VITLAB_GCS_URL", gcs_url)
        monkeypatch.setattr(hf_constants, "ENDPOINT", hf_url)  # what HF_ENDPOINT sets when the module loads
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hf_url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
        yield type("Hub", (), dict(model=model, npz=npz, sha=sha, faults=faults, hf_faults=hf_faults,
                                   root=tmp_path, cached=tmp_path / "home" / "hub" / "gcs" / gcs["gcs"]))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def test_create_model_by_name_downloads_converts_and_labels(hub, capsys):
    model = vitlab.create_model("vit_mu4_32px.test_gcs", pretrained=True)
    torch.testing.assert_close(logits(model), logits(hub.model), atol=1e-5, rtol=1e-5)
    assert model.pretrained_cfg["class_names"][:2] == ["airplane", "automobile"]
    assert model.pretrained_cfg["preprocess"]["resize"] == "squash"
    record = json.loads(hub.cached.with_name(hub.cached.name + ".json").read_text())
    assert record["sha256"] == hub.sha and record["server_hashes"]["md5"] == hashlib.md5(hub.npz.read_bytes()).hexdigest()
    gets = [r for r in hub.faults.requests if r[0] == "GET"]
    vitlab.create_model("vit_mu4_32px.test_gcs", pretrained=True)  # a cache hit: no new request
    assert [r for r in hub.faults.requests if r[0] == "GET"] == gets
    assert vitlab.create_model("vit_mu4_32px", pretrained=True).pretrained_cfg["pretrained"] == "vit_mu4_32px.test_gcs"


def test_pretrained_options_new_head_and_overrides(hub):
    model = vitlab.create_model("vit_mu4_32px.test_gcs", pretrained=True, num_classes=3, drop_path=0.1)
    assert model.cfg.num_classes == 3 and model.cfg.drop_path == 0.1
    assert model.pretrained_cfg["class_names"] is None and torch.all(model.head.weight == 0)
    n = len(hub.faults.requests)
    fresh = vitlab.create_model("vit_mu4_32px.test_hf")  # not pretrained: the architecture only, no download
    assert fresh.cfg.num_classes == 10 and len(hub.faults.requests) == n and not hub.hf_faults.requests


def test_transform_matches_the_preprocessing(hub):
    model = vitlab.create_model("vit_mu4_32px.test_gcs", pretrained=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))
    x = vitlab.transform_for(model)(img)
    assert x.shape == (3, 32, 32)  # squashed, not cropped: both sides resized
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_interrupted_download_resumes_with_range(hub):
    hub.faults.cut_after = 1000
    with pytest.raises(ValueError, match="resume"):
        vitlab.hub.load_pretrained("vit_mu4_32px.test_sha", progress=False)
    partial = hub.cached.with_name(hub.cached.name + ".incomplete")
    assert partial.stat().st_size == 1000 and not hub.cached.exists()
    vitlab.hub.load_pretrained("vit_mu4_32px.test_sha", progress=False)
    assert hub.faults.requests[-1] == ("GET", "/vit_models/test/Mu_4.npz", "bytes=1000-")
    assert cache.sha256_file(hub.cached) == hub.sha and not partial.exists()


def test_corrupt_downloads_leave_nothing_in_the_cache(hub):
    with pytest.raises(ValueError, match="sha256.*nothing was cached"):
        vitlab.hub.load_pretrained("vit_mu4_32px.test_badsha", progress=False)
    assert not hub.cached.exists() and not hub.cached.with_name(hub.cached.name + ".incomplete").exists()
    with pytest.raises(ValueError, match="bytes where the catalog says.*nothing was cached"):
        vitlab.hub.load_pretrained("vit_mu4_32px.test_truncated", progress=False)
    assert not hub.cached.exists() and not hub.cached.with_name(hub.cached.name + ".incomplete").exists()
    hub.faults.wrong_md5 = True
    with pytest.raises(ValueError, match="md5.*nothing was cached"):
        vitlab.hub.load_pretrained("vit_mu4_32px.test_gcs", progress=False)
    assert not list(hub.cached.parent.glob("Mu_4.npz*[!k]"))  # only the lock file may remain


def test_a_cached_file_that_fails_its_check_is_never_used(hub):
    vitlab.hub.load_pretrained("vit_mu4_32px.test_gcs", progress=False)
    data = bytearray(hub.cached.read_bytes())
    data[-10] ^= 0xFF
    hub.cached.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its check"):
        vitlab.hub.load_pretrained("vit_mu4_32px.test_gcs", progress=False)
    hub.cached.with_name(hub.cached.name + ".json").unlink()
    with pytest.raises(ValueError, match="has no record"):
        vitlab.hub.load_pretrained("vit_mu4_32px.test_gcs", progress=False)


def test_two_concurrent_downloads_make_one_good_file(hub):
    errors = []

    def fetch():
        try:
            vitlab.hub.fetch(vitlab.hub.entry_for("vit_mu4_32px.test_sha"), progress=False)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len([r for r in hub.faults.requests if r[0] == "GET"]) == 1
    assert cache.sha256_file(hub.cached) == hub.sha


def test_offline_with_and_without_the_file(hub, monkeypatch):
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    with pytest.raises(vitlab.hub.OfflineError, match=r"fetch http://127\.0\.0\.1:\d+/vit_models/test/Mu_4\.npz.*"
                                                      r"vitlab hub import FILE --name vit_mu4_32px\.test_gcs"):
        vitlab.hub.load_pretrained("vit_mu4_32px.test_gcs", progress=False)
    assert not hub.faults.requests
    monkeypatch.delenv("VITLAB_OFFLINE")
    vitlab.hub.load_pretrained("vit_mu4_32px.test_gcs", progress=False)
    n = len(hub.faults.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vitlab.hub.load_pretrained("vit_mu4_32px.test_gcs", progress=False)
    assert len(hub.faults.requests) == n


def test_hub_import_verifies_the_file(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    other = export_model(randomise(vitlab.create_model("vit_mu4_32px", num_classes=5)), tmp_path / "other.npz")
    assert main(["hub", "import", str(other), "--name", "vit_mu4_32px.test_gcs"]) == 2
    assert "num_classes" in capsys.readouterr().err and not hub.cached.exists()
    assert main(["hub", "import", str(hub.npz), "--name", "vit_mu4_32px.test_sha"]) == 0
    model = vitlab.create_model("vit_mu4_32px.test_sha", pretrained=True)
    torch.testing.assert_close(logits(model), logits(hub.model), atol=1e-5, rtol=1e-5)
    assert not hub.faults.requests


def test_hugging_face_repositories_through_huggingface_hub(hub):
    transformers_layout = vitlab.create_model("vit_mu4_32px.test_hf", pretrained=True)
    torch.testing.assert_close(logits(transformers_layout), logits(import_model(hub.root / "hf_root/test-org/mu4")[0]))
    timm_layout = vitlab.hub.load_pretrained("vit_mu4_32px.test_timm", progress=False)
    assert timm_layout.config.num_heads == 4  # from the catalog's preset: timm files do not record heads
    assert timm_layout.class_names[0] == "timm class 0"
    assert timm_layout.meta["preprocess"]["crop_pct"] == 1.0  # the catalog's preprocessing wins over the repo's
    assert any("/test-org/mu4-timm/resolve/main/config.json" in r[1] for r in hub.hf_faults.requests)
    by_repo = vitlab.hub.load_pretrained("hf-hub:test-org/mu4-unlisted", progress=False)  # any repository
    torch.testing.assert_close(logits(by_repo.model), logits(transformers_layout))
    assert by_repo.meta["preprocess"]["resize"] == "squash" and by_repo.class_names[3] == "LABEL_3"  # its id2label


def test_unknown_names_suggest_the_closest(hub):
    with pytest.raises(ValueError, match="did you mean vit_mu4_32px.test_gcs"):
        vitlab.create_model("vit_mu4_32px.test_gsc", pretrained=True)
    with pytest.raises(FileNotFoundError, match="did you mean"):
        vitlab.load_model("vit_mu4_32px.tes_gcs")


def test_cli_hub_verbs(hub, capsys):
    assert main(["hub", "list", "test_"]) == 0
    out = capsys.readouterr().out
    assert "vit_mu4_32px.test_gcs" in out and "vit_b16" not in out
    assert main(["hub", "info", "vit_mu4_32px.test_sha", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == hub.sha and info["url"].endswith("/vit_models/test/Mu_4.npz") and not info["cached"]
    assert main(["hub", "download", "vit_mu4_32px.test_gcs"]) == 0 and hub.cached.is_file()
    hub.cached.with_name("Mu_4.npz.incomplete").write_bytes(b"partial")
    assert main(["hub", "cache"]) == 0
    listing = capsys.readouterr().out
    assert "partial" in listing and "ok" in listing
    assert main(["hub", "cache", "--prune"]) == 0
    assert hub.cached.is_file() and not hub.cached.with_name("Mu_4.npz.incomplete").exists()


def test_cli_predict_eval_export_and_convert_by_name(hub, tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    assert main(["predict", "--model", "vit_mu4_32px.test_gcs", str(img), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{img}: ") and out.count(", ") == 2
    assert any(name in out for name in vitlab.hub.labels("cifar10"))
    assert main(["export", "--model", "vit_mu4_32px.test_gcs", str(tmp_path / "timm.safetensors")]) == 0
    assert main(["convert", str(hub.npz), str(tmp_path / "c.safetensors"), "--model", "vit_mu4_32px.test_gcs"]) == 0
    loaded = vitlab.load_model(tmp_path / "c.safetensors")
    assert loaded.class_names == vitlab.hub.labels("cifar10") and loaded.meta["preprocess"]["resize"] == "squash"
    assert main(["eval", "--model", "vit_mu4_32px.test_gcs"]) == 2
    assert "is a released model; pass --data" in capsys.readouterr().err
    assert main(["inspect", "--model", "vit_mu4_32px.test_gcs", "--images", str(img), "--out", str(tmp_path / "i")]) == 0
    assert (tmp_path / "i" / "report.html").is_file()



FAMILIES = {  # preset, its config changes, format, labels: one released layout each, at a tiny size
    "orig_in21k": ("vit_mu4_32px", {"num_classes": 21843, "representation_size": 128, "gelu": "tanh"}, "official",
                   "imagenet21k"),
    "big_vision_map": ("vit_mu4_32px", {"pool": "map", "class_token": False, "gelu": "tanh"}, "big_vision", "cifar10"),
    "hybrid": ("r8_vit_mu4_32px", {"gelu": "tanh", "resnet_width": 32, "num_groups": 32}, "official", "cifar10"),
    "bit": ("bit_r26x1_32px", {"num_groups": 32, "stem_width": 32, "stem_kernel": 7, "stem_pool": True}, "bit", "cifar10"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_by_name_from_its_released_layout(hub, family, monkeypatch):
    preset, changes, fmt, label_list = FAMILIES[family]
    model = randomise(vitlab.create_model(preset, **changes))
    path = f"vit_models/test/{family}.npz"
    export_model(model, hub.root / "bucket" / path, fmt)
    extra = hub.root / f"{family}.json"
    row = entry({"gcs": path}, fmt, architecture=preset, num_classes=model.cfg.num_classes, labels=label_list)
    extra.write_text(json.dumps({"models": {f"{preset}.test_{family}": row}}))
    monkeypatch.setenv("VITLAB_CATALOG", f"{hub.root / 'catalog.json'}{os.pathsep}{extra}")
    loaded = vitlab.hub.load_pretrained(f"{preset}.test_{family}", progress=False)
    if fmt == "bit":  # BiT's .npz records GroupNorm numerics of its own: compare with a direct import
        model = import_model(hub.root / "bucket" / path, "bit", image_size=32)[0]
    torch.testing.assert_close(logits(loaded.model), logits(model), atol=1e-4, rtol=1e-4)
    assert loaded.class_names == vitlab.hub.labels(label_list)


INDEX_COLUMNS = ("name,ds,epochs,lr,aug,wd,do,sd,best_val,final_val,final_test,adapt_ds,adapt_lr,adapt_steps,"
                 "adapt_resolution,adapt_final_val,adapt_final_test,params,infer_samples_per_sec,filename,adapt_filename")


def test_augreg_index_is_picked_as_the_official_colab(hub, capsys):
    up = {"a": "Mu_4-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0",
          "b": "Mu_4-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"}
    rows = [INDEX_COLUMNS]
    for run, final_val in (("a", 0.40), ("b", 0.45)):  # b is the better upstream by validation
        for lr, val in ((0.01, 0.90), (0.003, 0.93)):  # the second adaptation is better on val
            name = f"{up[run]}--cifar100-steps_10k-lr_{lr}-res_384"
            rows.append(f"B/16,i21k,300,0.001,{'light1' if run == 'a' else 'none'},0.1,0.0,0.0,{final_val},"
                        f"{final_val},0.4,cifar100,{lr},10000,384,{val},{val - 0.01},86000000,100,{up[run]},{name}")
    index = hub.root / "bucket" / "vit_models" / "augreg" / "index.csv"
    index.parent.mkdir(parents=True)
    index.write_text("\n".join(rows) + "\n")
    assert main(["hub", "list", "--augreg", "--upstream", "i21k", "--downstream", "cifar100", "--json"]) == 0
    picked = json.loads(capsys.readouterr().out)
    assert [r["adapt_filename"] for r in picked] == [f"{up['b']}--cifar100-steps_10k-lr_0.003-res_384"]
    assert main(["hub", "list", "--augreg", "--downstream", "imagenet2012", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    entry = vitlab.hub.entry_for(f"augreg:{picked[0]['adapt_filename']}")
    assert (entry.architecture, entry.image_size, entry.num_classes, entry.labels) == ("vit_b16", 384, 100, "cifar100")
    assert entry.source["gcs"] == f"vit_models/augreg/{picked[0]['adapt_filename']}.npz"
    assert entry.accuracy["top1"] == 92.0


def test_fewshot_and_finetune_start_from_a_name(hub, cifar, tmp_path, capsys):
    assert main(["fewshot", "--model", "vit_mu4_32px.test_gcs", "--data", str(cifar), "--shots", "1,2",
                 "--seeds", "1", "--cache-dir", str(tmp_path / "features"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["shots"] for r in report["ridge"]] == [1, 2]
    assert main(["finetune", "--model", "vit_mu4_32px.test_gcs", "--data", str(cifar), "--lr", "0.01",
                 "--steps", "2", "--batch-size", "16", "--accum-steps", "1", "--warmup-steps", "1",
                 "--out", str(tmp_path / "ft")]) == 0
    config = json.loads((tmp_path / "ft" / "final" / "config.json").read_text())
    assert config["train"]["init_from"] == "vit_mu4_32px.test_gcs"  # the run records the name, not a cache path


def test_augreg_index_offline_and_imported(hub, tmp_path, monkeypatch, capsys):
    index = tmp_path / "index.csv"
    index.write_text(INDEX_COLUMNS + "\nB/16,i21k,300,0.001,none,0.1,0.0,0.0,0.5,0.5,0.4,cifar100,0.01,10000,384,"
                     "0.9,0.89,86000000,100,up,up--cifar100-steps_10k-lr_0.01-res_384\n")
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    assert main(["hub", "list", "--augreg"]) == 2
    assert "vitlab hub import FILE --name augreg:index.csv" in capsys.readouterr().err
    assert main(["hub", "import", str(index), "--name", "augreg:index.csv"]) == 0
    assert main(["hub", "list", "--augreg", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])[0]["adapt_ds"] == "cifar100"
    assert not hub.faults.requests


def test_hugging_face_offline_uses_its_cache(hub, monkeypatch):
    online = vitlab.hub.load_pretrained("vit_mu4_32px.test_hf", progress=False)
    n = len(hub.hf_faults.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = vitlab.hub.load_pretrained("vit_mu4_32px.test_hf", progress=False)
    torch.testing.assert_close(logits(offline.model), logits(online.model))
    assert len(hub.hf_faults.requests) == n
    with pytest.raises(vitlab.hub.OfflineError, match="offline mode is on"):
        vitlab.hub.load_pretrained("hf-hub:test-org/mu4-unlisted", progress=False)
