"""What the server computes, on vitlab's own parts: decode an upload with the model's preprocessing,
run a batch (class probabilities, or attention rollout and per-head maps), PNGs, the model card."""
from __future__ import annotations

import base64
import io
import os
import tempfile
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, UnidentifiedImageError

from ..checkpoint import LoadedModel
from ..config import as_pair
from ..data import load_image
from ..inspect import (attention_modules, attention_rollout, capture_attention, model_card, plot_posemb_similarity,
                       posemb_similarity, token_grid, token_map)
from ..inspect.figures import upsample

PREDICT = ("predict",)  # the batch key of a class-probability request


class NotAnImage(ValueError):
    """The upload is no image format vitlab reads (415)."""


class _Upload(io.BytesIO):
    """Uploaded bytes that print as their file name (decoder errors name the upload, not an object)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__


def png_data_url(rgb: np.ndarray) -> str:
    """(H, W, 3) floats in [0, 1] -> a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay(rgb: np.ndarray, heat: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """A (rows, cols) map upsampled, coloured (jet) and blended over ``rgb`` (H, W, 3)."""
    colour = colormaps["jet"](upsample(heat, rgb.shape[:2]))[..., :3]
    return (1 - alpha) * rgb + alpha * colour


class ServedModel:
    """One loaded model as the server uses it; ``run`` is called on the batcher's single thread."""

    def __init__(self, loaded: LoadedModel, name: str) -> None:
        self.loaded, self.name = loaded, name
        self.model = loaded.model.eval()
        self.preprocess = loaded.preprocess
        self.class_names = loaded.class_names or [str(i) for i in range(self.model.cfg.num_classes)]
        self.attention = attention_modules(self.model)
        self._posemb: bytes | None = None

    def decode(self, data: bytes, filename: str) -> torch.Tensor:
        """Upload bytes -> the model's input (3, S, S); NotAnImage or ValueError (over the pixel cap, corrupt)."""
        try:
            return self.preprocess(load_image(_Upload(data, filename or "upload")))
        except ValueError as err:
            if isinstance(err.__cause__, UnidentifiedImageError):
                raise NotAnImage(f"{err}; upload a JPEG, PNG, WebP or BMP image") from None
            raise

    @torch.no_grad()
    def run(self, key: Hashable, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """A batch: ``PREDICT`` -> probabilities; ``("attention", head_fusion, discard_ratio)`` -> also
        the rollout (rows, cols) and every layer's per-head maps (layers, heads, rows, cols)."""
        param = next(self.model.parameters())
        x = torch.stack(images).to(param.device, param.dtype)
        if key == PREDICT:
            return [{"probs": p} for p in self.model(x).float().softmax(-1).cpu()]
        _, head_fusion, discard_ratio = key
        cfg = self.model.cfg
        with capture_attention(self.model) as maps:
            probs = self.model(x).float().softmax(-1).cpu()
        rollout = attention_rollout(maps, head_fusion=head_fusion, discard_ratio=discard_ratio)
        where = {"num_prefix_tokens": cfg.num_prefix_tokens, "pool": cfg.pool}
        rollout = token_map(rollout, **where).cpu()  # (B, patches)
        heads = torch.stack([token_map(m, **where) for m in maps], dim=1).cpu()  # (B, layers, heads, patches)
        grid = token_grid(rollout.shape[-1], tuple(x.shape[-2:]))
        return [{"probs": p, "rollout": r.unflatten(-1, grid), "heads": h.unflatten(-1, grid)}
                for p, r, h in zip(probs, rollout, heads)]

    def top_k(self, probs: torch.Tensor, k: int) -> list[dict[str, Any]]:
        """The ``k`` most probable classes: label, probability, index."""
        top = probs.topk(min(k, len(probs)))
        return [{"label": self.class_names[i], "prob": round(p, 6), "index": i}
                for p, i in zip(top.values.tolist(), top.indices.tolist())]

    def rgb(self, image: torch.Tensor) -> np.ndarray:
        """The model's input (3, S, S) as the image it saw: (S, S, 3) in [0, 1]."""
        mean = torch.tensor(self.preprocess.mean).view(3, 1, 1)
        std = torch.tensor(self.preprocess.std).view(3, 1, 1)
        return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    def info(self) -> dict[str, Any]:
        """The model card: name, parameters, resolution, labels, recorded accuracy, preprocessing, attention."""
        meta, cfg = self.loaded.meta, self.model.cfg
        accuracy = meta.get("accuracy") or {k: v for k, v in meta.items() if k.startswith("eval_")} or None
        attention = None
        if self.attention:
            attention = {"layers": len(self.attention), "heads": self.attention[0].num_heads}
        return {
            "name": self.name, "parameters": sum(p.numel() for p in self.model.parameters()),
            "resolution": list(as_pair(cfg.image_size)), "num_classes": cfg.num_classes, "labels": self.class_names,
            "accuracy": accuracy, "preprocess": {k: getattr(self.preprocess, k) for k in
                                                 ("image_size", "crop_pct", "interpolation", "resize", "mean", "std")},
            "attention": attention, "posemb": self.has_posemb, "card": model_card(self.loaded, self.name),
        }

    @property
    def has_posemb(self) -> bool:
        return isinstance(getattr(self.model, "pos_embed", None), torch.Tensor) and bool(self.attention)

    def posemb_png(self) -> bytes:
        """The position-embedding similarity figure (paper Fig. 7 centre) as PNG bytes, made once."""
        if self._posemb is None:
            cfg = self.model.cfg
            patches = self.model.pos_embed.shape[-2] - cfg.num_prefix_tokens
            grid = token_grid(patches, as_pair(cfg.image_size))
            sim = posemb_similarity(self.model.pos_embed, grid, num_prefix_tokens=cfg.num_prefix_tokens)
            with tempfile.TemporaryDirectory() as tmp:
                self._posemb = plot_posemb_similarity(sim, Path(tmp) / "posemb.png").read_bytes()
        return self._posemb
