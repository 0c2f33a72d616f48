"""Hugging Face ``ViTModel`` / ``ViTForImageClassification`` folders (config.json + weights).

The table targets the on-disk layout ``save_pretrained`` writes (``encoder.layer.{i}.attention.
attention.query`` ...), with ``vit.`` in front for ``ViTForImageClassification``. q, k and v are
separate Linears there and fused in vitlab. ``ViTModel``'s pooler (Linear + tanh on the [class]
token) is exactly vitlab's representation layer, so a ``ViTModel`` imports as a model with
``representation_size`` and no head whose output is ``pooler_output``. Numerics come from
config.json (``hidden_act``, ``layer_norm_eps``, 1e-12 by default) and the input normalisation
from preprocessor_config.json (0.5 / 0.5 when absent, the ViT image processor's default).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import write_json
from ..config import ViTConfig, as_pair
from .files import read_json, read_torch_weights, write_torch_weights
from .keymap import Entry, fused, one

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
GELU = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                   qkv_bias=True, pooler_act="tanh")
IGNORE = {"embeddings.mask_token": "the mask token is used only for masked-image modelling"}


@dataclass
class HFSource:
    """An HF ViT folder: tensors, config.json, preprocessor config, and the weight-key prefix."""

    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    preprocessor: dict[str, Any] | None
    prefix: str  # "vit." for ViTForImageClassification, "" for ViTModel
    notes: list[str] = field(default_factory=list)


def folder_of(path: str | Path) -> Path:
    """The HF folder for ``path``: itself, or the folder of a weights file next to a config.json."""
    path = Path(path)
    if path.is_file() and (path.parent / "config.json").is_file():
        return path.parent
    return path


def read(path: str | Path) -> HFSource:
    """Read an HF folder: config.json, the weights (one file or shards), preprocessor_config.json."""
    folder = folder_of(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = {**HF_DEFAULTS, **read_json(folder / "config.json")}
    if config.get("model_type") != "vit":
        raise ValueError(f"{folder}: model_type is {config.get('model_type')!r}, not 'vit'; only ViT folders import")
    tensors: dict[str, torch.Tensor] = {}
    index = next((folder / n for n in INDEX_FILES if (folder / n).is_file()), None)
    if index is not None:
        for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
            path = (folder / shard).resolve()
            if not path.is_relative_to(folder.resolve()):
                raise ValueError(f"{index} names the shard {shard!r} outside {folder}; refusing to read it")
            tensors.update(read_torch_weights(path))
    else:
        file = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
        if file is None:
            raise FileNotFoundError(f"{folder} has no weights ({', '.join(WEIGHT_FILES)})")
        tensors = read_torch_weights(file)
    pre_file = folder / "preprocessor_config.json"
    preprocessor = read_json(pre_file) if pre_file.is_file() else None
    prefix = "vit." if any(k.startswith("vit.") for k in tensors) else ""
    return HFSource(folder, tensors, config, preprocessor, prefix)


def class_names(src: HFSource, num_classes: int) -> list[str] | None:
    """The labels of ``id2label`` in index order, when they name every class."""
    labels = {int(k): v for k, v in (src.config.get("id2label") or {}).items()}
    if num_classes and sorted(labels) == list(range(num_classes)):
        return [labels[i] for i in range(num_classes)]
    return None


def config_fields(src: HFSource) -> dict[str, Any]:
    """The ``ViTConfig`` fields config.json (and the preprocessor config) describe."""
    c = src.config
    if c["hidden_act"] not in GELU:
        raise ValueError(f"{src.path}: hidden_act {c['hidden_act']!r} is not a GELU; vitlab supports {sorted(GELU)}")
    if "pooler.dense.weight" in src.tensors and c["pooler_act"] != "tanh":
        raise ValueError(f"{src.path}: pooler_act {c['pooler_act']!r}; vitlab's representation layer uses tanh")
    classifier = src.tensors.get("classifier.weight")
    pooler = src.tensors.get("pooler.dense.weight")
    pre = src.preprocessor or {}
    if src.preprocessor is None:
        src.notes.append("no preprocessor_config.json: assumed mean = std = 0.5 (the ViT image processor default)")
    image_size = c["image_size"]
    return dict(
        image_size=image_size if isinstance(image_size, int) else as_pair(image_size),
        patch_size=c["patch_size"] if isinstance(c["patch_size"], int) else as_pair(c["patch_size"])[0],
        in_channels=c["num_channels"], width=c["hidden_size"], depth=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"], qkv_bias=bool(c["qkv_bias"]),
        class_token=True, pool="token",
        representation_size=pooler.shape[0] if pooler is not None and classifier is None else None,
        num_classes=classifier.shape[0] if classifier is not None else 0,
        gelu=GELU[c["hidden_act"]], layer_norm_eps=float(c["layer_norm_eps"]),
        mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))), std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
        posemb_mode="bicubic",  # interpolate_pos_encoding
    )


def ignore(src: HFSource):
    """Keys an HF folder may hold that vitlab does not need, with the reason."""
    def why(key: str) -> str | None:
        bare = key.removeprefix(src.prefix)
        if bare in IGNORE:
            return IGNORE[bare]
        if bare.startswith("pooler.") and "classifier.weight" in src.tensors:
            return "ViTForImageClassification does not use the pooler"
        return None
    return why


def _linear(ours: str, theirs: str) -> list[Entry]:
    return [one(f"{ours}.weight", f"{theirs}.weight"), one(f"{ours}.bias", f"{theirs}.bias")]


def key_map(cfg: ViTConfig, prefix: str) -> list[Entry]:
    """The table vitlab key <-> HF key (``prefix`` "vit." for the classification model)."""
    p = prefix
    emb = f"{p}embeddings."
    entries = [*_linear("patch_embed.proj", f"{emb}patch_embeddings.projection"),
               one("cls_token", f"{emb}cls_token"), one("pos_embed", f"{emb}position_embeddings")]
    for i in range(cfg.depth):
        ours, theirs = f"blocks.{i}.", f"{p}encoder.layer.{i}."
        attn = f"{theirs}attention.attention."
        entries += _linear(ours + "norm1", theirs + "layernorm_before")
        entries.append(fused(ours + "attn.qkv.weight", [f"{attn}{n}.weight" for n in ("query", "key", "value")]))
        if cfg.qkv_bias:
            entries.append(fused(ours + "attn.qkv.bias", [f"{attn}{n}.bias" for n in ("query", "key", "value")]))
        entries += _linear(ours + "attn.proj", theirs + "attention.output.dense")
        entries += _linear(ours + "norm2", theirs + "layernorm_after")
        entries += _linear(ours + "mlp.fc1", theirs + "intermediate.dense")
        entries += _linear(ours + "mlp.fc2", theirs + "output.dense")
    entries += _linear("norm", f"{p}layernorm")
    if cfg.representation_size:
        entries += _linear("pre_logits.0", "pooler.dense")
    if cfg.num_classes:
        entries += _linear("head", "classifier")
    return entries


def export_prefix(cfg: ViTConfig) -> str:
    """Check that HF's ViT can express ``cfg``; the key prefix of the class it maps to."""
    if not cfg.class_token or cfg.pool != "token":
        raise ValueError("Hugging Face's ViT pools the [class] token; this model uses "
                         f"class_token={cfg.class_token}, pool={cfg.pool!r}")
    if cfg.representation_size and cfg.num_classes:
        raise ValueError("ViTForImageClassification has no representation layer; drop it with "
                         "model.reset_head(n, keep_pre_logits=False), or export to official .npz")
    return "vit." if cfg.num_classes else ""


def write(folder: str | Path, tensors: dict[str, torch.Tensor], cfg: ViTConfig,
          class_names: list[str] | None = None) -> Path:
    """Write config.json, model.safetensors and preprocessor_config.json that ``from_pretrained`` loads."""
    folder = Path(folder)
    if folder.suffix:
        raise ValueError(f"a Hugging Face export is a folder; {folder} has a file suffix")
    h, w = as_pair(cfg.image_size)
    names = class_names or [f"LABEL_{i}" for i in range(cfg.num_classes)]
    hidden_act = {"exact": "gelu", "tanh": "gelu_pytorch_tanh"}[cfg.gelu]
    config = {
        "architectures": ["ViTForImageClassification" if cfg.num_classes else "ViTModel"],
        "model_type": "vit", "hidden_size": cfg.width, "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.mlp_dim, "hidden_act": hidden_act,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps, "image_size": h if h == w else [h, w], "patch_size": cfg.patch_size,
        "num_channels": cfg.in_channels, "qkv_bias": cfg.qkv_bias, "encoder_stride": cfg.patch_size,
        "pooler_output_size": cfg.representation_size or cfg.width, "pooler_act": "tanh",
        "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
    }
    preprocessor = {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(cfg.mean), "image_std": list(cfg.std),
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_torch_weights(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    write_json(folder / "preprocessor_config.json", preprocessor)
    write_json(folder / "config.json", config)
    return folder
