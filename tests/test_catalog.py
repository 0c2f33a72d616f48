"""Integrity of the pretrained-model catalog (``vitlab/hub/catalog.json``) and the label lists (``hub/labels/``).

Pure data checks, then cross-checks against timm's pretrained cfgs (files, input size, crop, interpolation,
mean/std, classes, license) and timm's ImageNet class files. No network, no model is built.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HUB = ROOT / "src" / "vitlab" / "hub"
LABELS = HUB / "labels"
GCS = "https://storage.googleapis.com/"

# The vitlab presets an entry may name, and those the catalog needs that vitlab does not register yet.
PRESETS = {"vit_ti16", "vit_s16", "vit_s32", "vit_b8", "vit_b16", "vit_b32", "vit_l16", "vit_l32", "vit_h14",
           "bit_r50x1", "bit_r50x3", "bit_r101x1", "bit_r101x3", "bit_r152x2", "bit_r152x4",
           "r50_vit_b16", "r50_vit_l32", "r26_vit_s32", "r_vit_ti16", "vit_conv_32px"}
PENDING: set[str] = set()  # presets the catalog needs that vitlab.models does not register yet

# Output stride of each architecture (patch size, or the ResNet stem and stages times the patch).
STRIDE = {"vit_ti16": 16, "vit_s16": 16, "vit_s32": 32, "vit_b8": 8, "vit_b16": 16, "vit_b32": 32, "vit_l16": 16,
          "vit_l32": 32, "vit_h14": 14, "r50_vit_b16": 16, "r50_vit_l32": 32, "r26_vit_s32": 32, "r_vit_ti16": 16,
          "bit_r50x1": 32, "bit_r50x3": 32, "bit_r101x1": 32, "bit_r101x3": 32, "bit_r152x2": 32, "bit_r152x4": 32,
          "vit_conv_32px": 4}

# timm's architecture name for each preset (ViTs carry the resolution: ``<arch>_<px>``).
TIMM_VIT = {"vit_ti16": "vit_tiny_patch16", "vit_s16": "vit_small_patch16", "vit_s32": "vit_small_patch32",
            "vit_b8": "vit_base_patch8", "vit_b16": "vit_base_patch16", "vit_b32": "vit_base_patch32",
            "vit_l16": "vit_large_patch16", "vit_l32": "vit_large_patch32", "vit_h14": "vit_huge_patch14",
            "r50_vit_b16": "vit_base_r50_s16", "r50_vit_l32": "vit_large_r50_s32",
            "r26_vit_s32": "vit_small_r26_s32", "r_vit_ti16": "vit_tiny_r_s16_p8"}
TIMM_BIT = {"bit_r50x1": "resnetv2_50x1_bit", "bit_r50x3": "resnetv2_50x3_bit", "bit_r101x1": "resnetv2_101x1_bit",
            "bit_r101x3": "resnetv2_101x3_bit", "bit_r152x2": "resnetv2_152x2_bit",
            "bit_r152x4": "resnetv2_152x4_bit"}
BIT_TAGS = {"bit_m_in21k": "goog_in21k", "bit_m_in21k_ft_in1k": "goog_in21k_ft_in1k"}

# Entries with no timm twin, each for a reason: HF conversions (other preprocessing), and original 21k->1k
# files that timm no longer carries (it replaced them with AugReg weights).
NO_TWIN = {"vit_b16.hf_in21k_ft_in1k", "vit_b16.hf_in21k", "vit_b32.orig_in21k_ft_in1k",
           "vit_l16.orig_in21k_ft_in1k", "vit_l16.orig_in21k_ft_in1k_224"}

KEYS = {"architecture": str, "source": dict, "format": str, "image_size": int, "num_classes": int,
        "labels": (str, type(None)), "preprocess": dict, "license": str, "size": (int, type(None)),
        "sha256": (str, type(None)), "accuracy": (dict, type(None)), "description": str}
FORMATS = {"official", "big_vision", "bit", "timm", "hf", "vitlab"}
ACC_REQUIRED = {"top1", "data", "split", "source"}
ACC_OPTIONAL = {"top5", "image_size", "real_top1", "flip_tta_top1"}
# vitlab's own model, shipped in the package (tools/ship_model.py writes its entry and card).
PACKAGED = "vit_conv_32px.vitlab_cifar10"


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    assert not dup, f"duplicate JSON keys: {dup}"
    return dict(pairs)


CATALOG = json.loads((HUB / "catalog.json").read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
MODELS = CATALOG["models"]
ENTRIES = sorted(MODELS.items())


def _lines(name: str) -> list[str]:
    raw = (LABELS / f"{name}.txt").read_bytes()
    text = raw.decode("utf-8")  # strict: the file is UTF-8
    assert "\r" not in text and not text.startswith("\ufeff"), f"{name}.txt: use LF line ends and no BOM"
    assert text.endswith("\n") and not text.endswith("\n\n"), f"{name}.txt must end in exactly one newline"
    return text[:-1].split("\n")


def _label_files() -> list[str]:
    return sorted(p.stem for p in LABELS.glob("*.txt"))


# ---------------------------------------------------------------------------------------------- the file


def test_top_level():
    assert CATALOG["version"] == 1
    assert isinstance(CATALOG["_comment"], (str, list)) and CATALOG["_comment"]
    assert set(CATALOG) == {"_comment", "version", "defaults", "models"}
    assert isinstance(CATALOG["defaults"], dict) and isinstance(MODELS, dict) and MODELS


@pytest.mark.parametrize("name,entry", ENTRIES, ids=[n for n, _ in ENTRIES])
def test_entry_schema(name, entry):
    assert set(entry) == set(KEYS), f"keys differ: {set(entry) ^ set(KEYS)}"
    for key, kind in KEYS.items():
        assert isinstance(entry[key], kind) and not isinstance(entry[key], bool), f"{key}: {entry[key]!r}"
    assert re.fullmatch(r"[a-z0-9_]+\.[a-z0-9_]+", name), name
    preset, tag = name.split(".")
    assert preset == entry["architecture"]
    assert entry["architecture"] in PRESETS | PENDING
    assert entry["format"] in FORMATS
    assert entry["license"] == "Apache-2.0"
    assert entry["image_size"] > 0 and entry["image_size"] % STRIDE[preset] == 0
    assert entry["num_classes"] >= 0
    if entry["num_classes"]:
        assert entry["labels"] is not None
    else:
        assert entry["labels"] is None, "a headless checkpoint has no label list"
    assert entry["size"] is None or entry["size"] > 0
    assert entry["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
    if entry["accuracy"] is not None:
        acc = entry["accuracy"]
        assert ACC_REQUIRED <= set(acc) <= ACC_REQUIRED | ACC_OPTIONAL, f"accuracy keys: {sorted(acc)}"
    desc = entry["description"]
    assert desc and "\n" not in desc and desc == desc.strip()
    assert f"{entry['image_size']} px" in desc, "the description gives the resolution"


def test_accuracy_values():
    """Every published accuracy has a top-1 in (0, 100] and says on what data, which split and from where."""
    filled = [(n, e["accuracy"]) for n, e in ENTRIES if e["accuracy"] is not None]
    assert filled, "no entry has an accuracy"
    for name, acc in filled:
        top1 = acc["top1"]
        assert isinstance(top1, (int, float)) and not isinstance(top1, bool) and 0 < top1 <= 100, name
        for key in ("data", "split", "source"):
            assert isinstance(acc[key], str) and acc[key].strip(), f"{name}: accuracy {key}"
        for key in ("top5", "real_top1"):
            if key in acc:
                assert isinstance(acc[key], (int, float)) and 0 < acc[key] <= 100, f"{name}: accuracy {key}"
        if "top5" in acc:
            assert acc["top5"] >= top1, name
        if "image_size" in acc:
            assert acc["image_size"] == MODELS[name]["image_size"], f"{name}: measured at another size"
        if acc["data"] == "imagenet2012":
            assert MODELS[name]["num_classes"] == 1000, f"{name}: an ImageNet accuracy needs a 1000-class head"


@pytest.mark.parametrize("name,entry", ENTRIES, ids=[n for n, _ in ENTRIES])
def test_preprocess(name, entry):
    pre = entry["preprocess"]
    assert set(pre) == {"crop_pct", "interpolation", "resize", "mean", "std"}
    assert 0 < pre["crop_pct"] <= 1
    assert pre["interpolation"] in {"bilinear", "bicubic"}
    assert pre["resize"] in {"shorter", "squash"}
    if pre["resize"] == "squash":
        assert pre["crop_pct"] == 1.0, "a squash resize has no crop"
    for key in ("mean", "std"):
        assert len(pre[key]) == 3 and all(isinstance(v, float) for v in pre[key])
    assert all(s > 0 for s in pre["std"])
    if entry["format"] == "hf":  # ViTImageProcessor: resize to size x size, bilinear, no crop
        assert pre == {"crop_pct": 1.0, "interpolation": "bilinear", "resize": "squash",
                       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


@pytest.mark.parametrize("name,entry", ENTRIES, ids=[n for n, _ in ENTRIES])
def test_source(name, entry):
    src, fmt = entry["source"], entry["format"]
    if "package" in src:
        assert name == PACKAGED and fmt == "vitlab" and set(src) == {"package"}
        file = HUB / "models" / src["package"]
        assert file.is_file() and file.stat().st_size == entry["size"]
        assert hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"]
        assert (HUB / "models" / f"{name}.md").is_file(), "the shipped model has a model card"
    elif "gcs" in src:
        assert set(src) == {"gcs"}
        path = src["gcs"]
        assert path.endswith(".npz") and not path.startswith(("/", "gs:", "http")) and " " not in path
        top = path.split("/", 1)[0]
        assert {"vit_models": "official", "bit_models": "bit"}[top] == fmt, f"{path} with format {fmt}"
    else:
        assert set(src) == {"hf", "revision", "files"}
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", src["hf"]) and src["revision"]
        assert "config.json" in src["files"] and "model.safetensors" in src["files"]
        assert len(set(src["files"])) == len(src["files"])
        assert fmt in {"hf", "timm"}
        if fmt == "hf":
            assert src["hf"].startswith("google/") and "preprocessor_config.json" in src["files"]
        else:
            assert src["hf"].startswith("timm/")


def test_sources_are_distinct():
    seen = {}
    for name, entry in ENTRIES:
        key = json.dumps(entry["source"], sort_keys=True)
        assert key not in seen, f"{name} and {seen.get(key)} share a file"
        seen[key] = name


def test_tags_match_contents():
    """The tag words say what the file holds: in21k upstream = 21843 classes, *_ft_in1k / *_in1k = 1000."""
    for name, entry in ENTRIES:
        tag = name.split(".")[1]
        if tag.endswith("_384"):
            assert entry["image_size"] == 384, name
        if tag.endswith("_224"):
            assert entry["image_size"] == 224, name
        if tag in {"augreg_in21k", "orig_in21k", "bit_m_in21k"}:
            assert (entry["num_classes"], entry["labels"]) == (21843, "imagenet21k"), name
        if "in1k" in tag:
            assert (entry["num_classes"], entry["labels"]) == (1000, "imagenet1k"), name
        if tag == "orig_in21k_ft_in1k" and entry["format"] == "official":
            assert entry["image_size"] == 384 and "-224" not in entry["source"]["gcs"], name


def test_family_counts():
    """The released families the catalog covers (a changed count is a deliberate edit of this test)."""
    tags = [n.split(".")[1] for n in MODELS]
    counts = {t: tags.count(t) for t in set(tags)}
    assert counts == {"orig_in21k": 6, "orig_in21k_ft_in1k": 5, "orig_in21k_ft_in1k_224": 2,
                      "augreg_in21k": 10, "augreg_in21k_ft_in1k": 10, "augreg_in21k_ft_in1k_384": 9,
                      "augreg_in1k": 3, "augreg_in1k_384": 3, "sam_in1k": 2, "augreg2_in21k_ft_in1k": 2,
                      "hf_in21k_ft_in1k": 1, "hf_in21k": 1, "bit_m_in21k": 6, "bit_m_in21k_ft_in1k": 6,
                      "vitlab_cifar10": 1}


# ---------------------------------------------------------------------------------------------- defaults


def test_defaults():
    defaults = CATALOG["defaults"]
    archs = {e["architecture"] for e in MODELS.values()}
    assert set(defaults) == archs, "every architecture with weights has a default, and only those"
    for preset, tag in defaults.items():
        name = f"{preset}.{tag}"
        assert name in MODELS, f"default {name} is not in the catalog"
        if preset not in ("vit_h14", "vit_conv_32px"):  # H/14: only the 21k upstream; vitlab's own: CIFAR-10
            assert MODELS[name]["num_classes"] == 1000, f"default {name} should be an ImageNet-1k classifier"


def test_architectures_registered_in_vitlab():
    models = pytest.importorskip("vitlab.models")
    known = set(models.list_models())
    missing = sorted({e["architecture"] for e in MODELS.values()} - known)
    assert set(missing) <= PENDING, f"architectures that are not vitlab presets: {missing}"
    assert PRESETS <= known, f"presets this test expects but vitlab lacks: {sorted(PRESETS - known)}"
    if missing:
        pytest.skip(f"catalog entries wait for presets not yet in vitlab.models: {missing}")


# ---------------------------------------------------------------------------------------------- labels


def test_every_label_file_is_used_and_documented():
    used = {e["labels"] for e in MODELS.values()} - {None}
    files = set(_label_files())
    assert used <= files, f"missing label files: {sorted(used - files)}"
    readme = (LABELS / "README.md").read_text(encoding="utf-8")
    for name in files:
        assert f"`{name}.txt`" in readme, f"{name}.txt is not described in labels/README.md"


@pytest.mark.parametrize("name,entry", [(n, e) for n, e in ENTRIES if e["labels"]], ids=lambda x: str(x)[:60])
def test_label_count(name, entry):
    assert len(_lines(entry["labels"])) == entry["num_classes"]


@pytest.mark.parametrize("name", _label_files())
def test_label_file_format(name):
    lines = _lines(name)
    assert all(line and line == line.strip() for line in lines), "no empty lines or stray spaces"
    assert len(set(lines)) == len(lines), "no repeated class"
    if name.startswith("imagenet"):
        for line in lines:
            synset, _, lemma = line.partition("\t")
            assert re.fullmatch(r"n\d{8}", synset), line
            assert "\t" not in lemma
    else:
        assert not any("\t" in line for line in lines)


def test_small_label_lists():
    assert _lines("cifar10") == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                 "truck"]
    cifar100 = _lines("cifar100")
    assert len(cifar100) == 100 and cifar100 == sorted(cifar100)  # CIFAR-100 fine labels are alphabetical
    assert cifar100[:10] == ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
                             "bottle"]
    assert cifar100[-3:] == ["wolf", "woman", "worm"]
    pets = _lines("oxford_iiit_pet")
    assert len(pets) == 37 and pets == sorted(pets, key=str.lower)  # list.txt class ids follow the names
    cats = [p for p in pets if p[0].isupper()]
    assert cats == ["Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau", "Maine_Coon",
                    "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx"]  # 12 cats, 25 dogs
    flowers = _lines("oxford_flowers102")
    assert len(flowers) == 102 and flowers[0] == "pink primrose" and flowers[-1] == "blackberry lily"


def test_flowers_match_torchvision():
    datasets = pytest.importorskip("torchvision.datasets")
    assert _lines("oxford_flowers102") == list(datasets.Flowers102.classes)


@pytest.mark.parametrize("name,subset,n", [("imagenet1k", "imagenet-1k", 1000), ("imagenet21k", "imagenet-21k-goog", 21843)])
def test_imagenet_labels_match_timm(name, subset, n):
    data = pytest.importorskip("timm.data")
    info = data.ImageNetInfo(subset)
    lines = _lines(name)
    assert len(lines) == n == info.num_classes()
    synsets = [line.partition("\t")[0] for line in lines]
    lemmas = [line.partition("\t")[2] for line in lines]
    assert synsets == list(info.label_names())
    assert lemmas == [info.index_to_description(i) for i in range(n)]
    if name == "imagenet1k":
        assert lines[0] == "n01440764\ttench, Tinca tinca" and synsets == sorted(synsets)


def test_imagenet_labels_are_the_generators_output():
    pytest.importorskip("timm")
    spec = importlib.util.spec_from_file_location("make_labels", ROOT / "tools" / "make_labels.py")
    make_labels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_labels)
    texts, missing = make_labels.build()
    for file, text in texts.items():
        assert (LABELS / file).read_text(encoding="utf-8") == text, f"{file}: run tools/make_labels.py"
        assert missing[file] == 0


# ---------------------------------------------------------------------------------------------- timm


def _timm_twin(name: str, entry: dict) -> str | None:
    """timm's pretrained name for the same file, or None (see NO_TWIN)."""
    preset, tag = name.split(".")
    if preset in TIMM_BIT:
        return f"{TIMM_BIT[preset]}.{BIT_TAGS[tag]}" if tag in BIT_TAGS else None
    if tag.startswith("hf_"):
        return None
    tag = re.sub(r"_(224|384)$", "", tag)
    return f"{TIMM_VIT[preset]}_{entry['image_size']}.{tag}"


@pytest.fixture(scope="module")
def timm_cfgs():
    timm = pytest.importorskip("timm")
    from timm.models import get_pretrained_cfg

    names = set(timm.list_pretrained())
    return {n: get_pretrained_cfg(n).to_dict() for n in names if n.split(".")[0].rsplit("_", 1)[0] in
            set(TIMM_VIT.values()) or n.split(".")[0] in set(TIMM_BIT.values())}


def test_timm_twins(timm_cfgs):
    """Every entry with a timm twin agrees with timm's cfg; the twinless ones are exactly NO_TWIN."""
    twinless = set()
    for name, entry in ENTRIES:
        if name == PACKAGED:  # vitlab's own model: timm has no such file
            continue
        twin = _timm_twin(name, entry)
        if twin not in timm_cfgs:
            twinless.add(name)
            continue
        cfg, pre = timm_cfgs[twin], entry["preprocess"]
        where = f"{name} vs timm {twin}"
        assert tuple(cfg["input_size"]) == (3, entry["image_size"], entry["image_size"]), where
        assert cfg["crop_pct"] == pre["crop_pct"], where
        assert cfg["interpolation"] == pre["interpolation"], where
        assert tuple(cfg["mean"]) == tuple(pre["mean"]) and tuple(cfg["std"]) == tuple(pre["std"]), where
        assert pre["resize"] == "shorter" and cfg.get("crop_mode", "center") == "center", where
        assert (cfg.get("license") or "").lower() == entry["license"].lower(), where
        if name.endswith(".orig_in21k"):
            # timm's HF copies of these drop the released 21k head, which is not valid; the file holds 21843
            assert cfg["num_classes"] == 0 and entry["num_classes"] == 21843, where
        else:
            assert cfg["num_classes"] == entry["num_classes"], where
        url = cfg.get("url") or ""
        if url.startswith(GCS):
            assert entry["source"] == {"gcs": url[len(GCS):]}, where
        if entry["format"] == "timm":
            assert entry["source"]["hf"] == cfg["hf_hub_id"], where
    assert twinless == NO_TWIN


def test_twinless_original_files_follow_timm_recipe(timm_cfgs):
    """The original 21k->1k files timm dropped take the preprocessing of the ones it keeps (384: crop 1.0)."""
    ref = {384: timm_cfgs["vit_base_patch16_384.orig_in21k_ft_in1k"],
           224: timm_cfgs["vit_base_patch16_224.orig_in21k_ft_in1k"]}
    for name in sorted(NO_TWIN):
        entry = MODELS[name]
        if entry["format"] != "official":
            continue
        cfg = ref[entry["image_size"]]
        assert entry["preprocess"] == {"crop_pct": cfg["crop_pct"], "interpolation": cfg["interpolation"],
                                       "resize": "shorter", "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def test_every_timm_gcs_file_is_in_the_catalog(timm_cfgs):
    """Every Google-released file timm names by its gcs url (AugReg, SAM) has a catalog entry."""
    ours = {e["source"].get("gcs") for e in MODELS.values()}
    theirs = {c["url"][len(GCS):]: n for n, c in timm_cfgs.items()
              if (c.get("url") or "").startswith(GCS + "vit_models/")}
    assert theirs, "timm names no gcs file any more"
    missing = sorted(n for path, n in theirs.items() if path not in ours)
    assert not missing, f"timm pretrained cfgs with a Google gcs file the catalog lacks: {missing}"


def test_every_timm_google_tag_is_in_the_catalog(timm_cfgs):
    """timm's orig / augreg / goog BiT checkpoints of these architectures all have a catalog twin."""
    twins = {_timm_twin(n, e) for n, e in ENTRIES if n != PACKAGED}
    google = [n for n in timm_cfgs
              if re.search(r"\.(orig_in21k|orig_in21k_ft_in1k|augreg_in21k|augreg_in21k_ft_in1k|augreg_in1k|"
                           r"augreg2_in21k_ft_in1k|sam_in1k|goog_in21k|goog_in21k_ft_in1k)$", n)]
    missing = sorted(set(google) - twins)
    assert not missing, f"timm checkpoints without a catalog entry: {missing}"
