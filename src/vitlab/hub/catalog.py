"""The catalog of released pretrained models (``catalog.json``, data) and their label lists (``labels/``).

A name is ``<preset>.<tag>`` with timm's tag words (``vit_b16.augreg_in21k_ft_in1k``); a bare
preset means its default tag (``defaults`` in the catalog); ``hf-hub:ORG/REPO[@REVISION]`` is any
Hugging Face ViT repository. Unknown names fail with the closest names.
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..data.images import Preprocess

HF_PREFIX = "hf-hub:"
FORMATS = ("official", "big_vision", "bit", "timm", "hf", "vitlab")


@dataclass(frozen=True)
class Pretrained:
    """One released model: where its file is, what it holds, and how to feed it."""

    name: str
    architecture: str  # a vitlab preset
    source: dict[str, Any]  # {"gcs": path} | {"hf": repo, "revision": rev, "files": [...]} | {"package": file}
    format: str
    image_size: int
    num_classes: int
    labels: str | None
    preprocess: Preprocess
    license: str = ""
    size: int | None = None
    sha256: str | None = None
    accuracy: dict[str, Any] | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """Where the file comes from: ``gcs``, ``hf`` or ``package``."""
        return next(k for k in ("gcs", "hf", "package") if k in self.source)

    def to_dict(self) -> dict[str, Any]:
        """The catalog fields as plain JSON values (for ``hub info --json`` and model metadata)."""
        return {"name": self.name, "architecture": self.architecture, "source": self.source, "format": self.format,
                "image_size": self.image_size, "num_classes": self.num_classes, "labels": self.labels,
                "preprocess": preprocess_dict(self.preprocess), "license": self.license, "size": self.size,
                "sha256": self.sha256, "accuracy": self.accuracy, "description": self.description}


def preprocess_dict(p: Preprocess) -> dict[str, Any]:
    """A Preprocess as JSON-ready values."""
    return {"image_size": p.image_size, "crop_pct": p.crop_pct, "interpolation": p.interpolation,
            "resize": p.resize, "mean": list(p.mean), "std": list(p.std)}


def _entry(name: str, raw: dict[str, Any]) -> Pretrained:
    """A catalog row -> Pretrained; a malformed row names the field."""
    try:
        pre = raw["preprocess"]
        preprocess = Preprocess(image_size=int(raw["image_size"]), crop_pct=float(pre.get("crop_pct", 1.0)),
                                interpolation=pre.get("interpolation", "bicubic"),
                                resize=pre.get("resize", "shorter"), mean=tuple(pre["mean"]), std=tuple(pre["std"]))
        known = {"architecture", "source", "format", "image_size", "num_classes", "labels", "preprocess", "license",
                 "size", "sha256", "accuracy", "description"}
        entry = Pretrained(name=name, architecture=raw["architecture"], source=dict(raw["source"]),
                           format=raw["format"], image_size=int(raw["image_size"]),
                           num_classes=int(raw["num_classes"]), labels=raw.get("labels"), preprocess=preprocess,
                           license=raw.get("license", ""), size=raw.get("size"), sha256=raw.get("sha256"),
                           accuracy=raw.get("accuracy"), description=raw.get("description", ""),
                           extra={k: v for k, v in raw.items() if k not in known})
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"catalog entry {name!r} is malformed ({type(err).__name__}: {err})") from err
    if entry.format not in FORMATS:
        raise ValueError(f"catalog entry {name!r} has an unknown format {entry.format!r}")
    return entry


def _catalog() -> tuple[dict[str, Pretrained], dict[str, str]]:
    """The packaged catalog, with the entries of ``$VITLAB_CATALOG`` (JSON files, ``os.pathsep``-separated)
    added or replacing packaged ones: private models, mirrors with their own hashes."""
    return _read_catalogs(os.environ.get("VITLAB_CATALOG", ""))


@cache
def _read_catalogs(extra: str) -> tuple[dict[str, Pretrained], dict[str, str]]:
    texts = [("vitlab/hub/catalog.json", resources.files(__package__).joinpath("catalog.json").read_text("utf-8"))]
    for path in filter(None, extra.split(os.pathsep)):
        try:
            texts.append((path, Path(path).read_text(encoding="utf-8")))
        except OSError as err:
            raise ValueError(f"cannot read the catalog {path} named by VITLAB_CATALOG: {err}") from None
    entries: dict[str, Pretrained] = {}
    defaults: dict[str, str] = {}
    for where, text in texts:
        try:
            raw = json.loads(text)
            models = raw["models"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"the catalog {where} is not a catalog JSON file ({err})") from None
        entries.update({n: _entry(n, r) for n, r in models.items()})
        defaults.update(raw.get("defaults", {}))
    return entries, defaults


def list_pretrained(pattern: str = "") -> list[str]:
    """Catalog names, optionally only those matching ``pattern`` (a substring or a ``*`` glob)."""
    names = sorted(_catalog()[0])
    if not pattern:
        return names
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return [n for n in names if fnmatch.fnmatchcase(n, glob)]


def default_tag(preset: str) -> str | None:
    """The tag ``create_model(preset, pretrained=True)`` takes, or None if the preset has no weights."""
    return _catalog()[1].get(preset)


def is_pretrained_name(ref: str) -> bool:
    """True if ``ref`` names a released model (a catalog name, a preset with a default tag, or hf-hub:)."""
    entries, defaults = _catalog()
    return ref.startswith(HF_PREFIX) or ref in entries or ref in defaults


def suggest(name: str, n: int = 4) -> list[str]:
    """The catalog names (and presets with weights) closest to ``name``."""
    entries, defaults = _catalog()
    return difflib.get_close_matches(name, [*entries, *defaults], n=n, cutoff=0.5)


def get_pretrained(name: str) -> Pretrained:
    """The catalog entry of ``name`` (a bare preset takes its default tag); unknown names get suggestions."""
    entries, defaults = _catalog()
    if name.startswith(HF_PREFIX):
        return hf_entry(name)
    if name in defaults:
        name = f"{name}.{defaults[name]}"
    if name not in entries:
        near = suggest(name)
        hint = f"did you mean {', '.join(near)}?" if near else "see `vitlab hub list`"
        raise ValueError(f"unknown pretrained model {name!r}; {hint}")
    return entries[name]


def hf_entry(name: str) -> Pretrained:
    """A catalog-like entry for ``hf-hub:ORG/REPO[@REVISION]``: the repository decides the rest on download."""
    repo, _, revision = name[len(HF_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{name!r} is not a Hugging Face repository name; write hf-hub:ORG/REPO "
                         f"(e.g. hf-hub:google/vit-base-patch16-224)")
    for entry in _catalog()[0].values():  # a repository the catalog knows keeps its labels and numbers
        if entry.source.get("hf") == repo and entry.source.get("revision", "main") == (revision or "main"):
            return entry
    return Pretrained(name=name, architecture="", source={"hf": repo, "revision": revision or "main", "files": []},
                      format="hf", image_size=0, num_classes=0, labels=None, preprocess=Preprocess(image_size=224),
                      description=f"Hugging Face repository {repo}")


@cache
def _label_file(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    path = resources.files(__package__).joinpath("labels", f"{name}.txt")
    if not path.is_file():
        raise ValueError(f"no label list {name!r} in vitlab/hub/labels/")
    ids, names = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        key, tab, label = line.partition("\t")
        ids.append(key if tab else "")
        names.append(label if tab else key)
    return tuple(ids), tuple(names)


def labels(name: str) -> list[str]:
    """The class names of the label list ``name`` in class-index order (``imagenet1k``, ``cifar10``, ...).

    WordNet lists give each class's lemmas (``tench, Tinca tinca``); ``synsets(name)`` gives the ids.
    """
    return list(_label_file(name)[1])


def synsets(name: str) -> list[str]:
    """The WordNet ids of the label list ``name`` (empty strings where a list has none)."""
    return list(_label_file(name)[0])
