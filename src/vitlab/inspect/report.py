"""``inspect_checkpoint``: every figure for one checkpoint, and a self-contained HTML report."""
from __future__ import annotations

import base64
import html
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import LoadedModel, atomic_write, write_json
from ..hub import load_model
from ..config import as_pair, to_dict
from ..flops import count_flops
from .capture import attention_modules
from .distance import mean_attention_distance, patch_distances
from .embeddings import embedding_filters, posemb_similarity
from .figures import plot_attention, plot_attention_distance, plot_embedding_filters, plot_posemb_similarity
from .images import find_images, load_images, sample_images
from .rollout import HeadFusion, attention_maps, token_grid

_ARCH_FIELDS = ("resnet_layers", "resnet_width", "layers", "width_factor", "stem_width",  # ResNet (BiT, hybrid)
                "width", "depth", "mlp_dim", "num_heads", "patch_size", "pool", "class_token")


def model_card(loaded: LoadedModel, checkpoint: str | os.PathLike = "") -> dict[str, str]:
    """Rows of the model card: name, architecture, parameters, FLOPs, resolution, recorded metrics."""
    model, cfg, meta = loaded.model, loaded.model.cfg, loaded.meta
    try:
        gflops = f"{count_flops(model) / 1e9:.3f}"
    except TypeError:
        gflops = "n/a"
    h, w = as_pair(cfg.image_size)
    card = {
        "checkpoint": str(checkpoint),
        "model": str(meta.get("preset") or meta.get("model") or type(model).__name__),
        "architecture": ", ".join(f"{f} {getattr(cfg, f)}" for f in _ARCH_FIELDS if hasattr(cfg, f)),
        "parameters": f"{sum(p.numel() for p in model.parameters()):,}",
        "GFLOPs per image": gflops,
        "resolution": f"{h}x{w}",
        "classes": str(getattr(cfg, "num_classes", "n/a")),
    }
    if loaded.class_names:
        names = loaded.class_names
        card["class names"] = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    for key, value in meta.items():
        if isinstance(value, (int, float, str, bool)) and key not in ("preset", "model"):
            card[key] = f"{value:.4f}" if isinstance(value, float) else str(value)
    return card


def inspect_checkpoint(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                       data: str | os.PathLike | None = None, head_fusion: HeadFusion = "mean",
                       discard_ratio: float = 0.0, start_layer: int = 0, num_images: int = 128,
                       device: str | torch.device = "cpu", log: Callable[[str], None] = lambda message: None) -> Path:
    """Write the attention maps of ``images``, the paper's Fig. 7 panels and ``report.html`` to ``out``.

    Mean attention distance uses up to ``num_images`` images from the data set ``data``, or the
    given ``images`` when there is none. A model without attention (a BiT ResNet) gets the model
    card and its predictions only, and ``log`` says so. Returns the report's path.
    """
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; use e.g. 'cpu' or 'cuda'") from err
    loaded = load_model(checkpoint, map_location=device)
    model, cfg = loaded.model, loaded.model.cfg
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = find_images(images)
    x, rgb = load_images(paths, cfg.image_size, cfg.mean, cfg.std)
    if not attention_modules(model):
        return _report_without_attention(loaded, checkpoint, paths, x, out, log)
    rollout, heads, logits = attention_maps(model, x, head_fusion=head_fusion, discard_ratio=discard_ratio,
                                            start_layer=start_layer)
    sections: list[tuple[str, list[tuple[Path, str]]]] = []

    shown = []
    for i, path in enumerate(paths):
        caption = f"{path.name}: {_prediction(logits[i], loaded.class_names, cfg.num_classes)}"
        png = plot_attention(rgb[i], rollout[i], heads[i], out / f"attention_{i:03d}_{path.stem}.png", title=caption)
        shown.append((png, caption))
    sections.append((f"Attention rollout ({head_fusion} over heads, discard ratio {discard_ratio}, "
                     f"from layer {start_layer}) and the last layer's heads", shown))

    h, w = as_pair(cfg.image_size)
    grid = token_grid(rollout[0].numel(), (h, w))
    if isinstance(getattr(model, "pos_embed", None), torch.Tensor):
        sim = posemb_similarity(model.pos_embed, grid, num_prefix_tokens=cfg.num_prefix_tokens)
        png = plot_posemb_similarity(sim, out / "posemb_similarity.png")
        sections.append(("Position embedding similarity", [(png, "cosine similarity of each position's "
                                                                 "embedding to all others (paper Fig. 7 centre)")]))

    sample = sample_images(data, num_images, cfg.image_size, cfg.mean, cfg.std) if data else x[:num_images]
    dist = mean_attention_distance(model, sample)
    uniform = float(patch_distances(grid, (h / grid[0], w / grid[1])).mean())
    png = plot_attention_distance(dist, out / "attention_distance.png", uniform=uniform, num_images=len(sample))
    sections.append(("Mean attention distance", [(png, f"per head and layer over {len(sample)} images; dashed: "
                                                        f"uniform attention ({uniform:.1f} px) (paper Fig. 7 right)")]))

    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(proj, torch.nn.Conv2d) and proj.in_channels in (1, 3) and proj.weight.shape[-1] > 1:  # on pixels
        filters = embedding_filters(proj.weight)
        png = plot_embedding_filters(filters, out / "embedding_filters.png")
        sections.append(("Embedding filters", [(png, f"top {len(filters)} principal components of the patch "
                                                     "projection (paper Fig. 7 left)")]))

    card = model_card(loaded, checkpoint)
    write_json(out / "summary.json", {
        "card": card, "config": to_dict(cfg), "images": [str(p) for p in paths],
        "predictions": [_prediction(row, loaded.class_names, cfg.num_classes) for row in logits],
        "mean_attention_distance": dist.tolist(), "uniform_attention_distance": uniform,
    })
    return write_report(out / "report.html", card, sections)


def _report_without_attention(loaded: LoadedModel, checkpoint: str | os.PathLike, paths: Sequence[Path],
                              x: torch.Tensor, out: Path, log: Callable[[str], None]) -> Path:
    """The model card and predictions of a model with no attention layers, and a note that says so."""
    model, cfg = loaded.model, loaded.model.cfg
    note = (f"{type(model).__name__} has no attention layers, so there are no attention maps, attention "
            f"distances or position embeddings to show; the report holds the model card and predictions")
    log(f"note: {note}")
    param = next(model.parameters())
    with torch.no_grad():
        logits = model(x.to(param.device, param.dtype)).float().cpu()  # (B, classes)
    predictions = [_prediction(row, loaded.class_names, cfg.num_classes) for row in logits]
    card = {**model_card(loaded, checkpoint), "attention": "none (no attention layers)"}
    card.update({f"prediction: {p.name}": pred for p, pred in zip(paths, predictions)})
    write_json(out / "summary.json", {"card": card, "config": to_dict(cfg), "images": [str(p) for p in paths],
                                      "predictions": predictions, "attention": None, "note": note})
    return write_report(out / "report.html", card, [(note, [])])


def _prediction(logits: torch.Tensor, class_names: list[str] | None, num_classes: int) -> str:
    if not num_classes:
        return "no classifier head"
    prob, idx = logits.float().softmax(-1).max(-1)
    name = class_names[idx] if class_names and idx < len(class_names) else f"class {int(idx)}"
    return f"{name} ({float(prob):.1%})"


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def write_report(path: str | os.PathLike, card: dict[str, Any],
                 sections: Sequence[tuple[str, Sequence[tuple[Path, str]]]]) -> Path:
    """One HTML file with the model card and every figure embedded (base64 PNG)."""
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in card.items())
    body = [f"<h1>vitlab inspect: {html.escape(card.get('model', ''))}</h1>", f"<table>{rows}</table>"]
    for title, figures in sections:
        body.append(f"<h2>{html.escape(title)}</h2>")
        body += [f"<figure>{_img_tag(p)}<figcaption>{html.escape(c)}</figcaption></figure>" for p, c in figures]
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>vitlab inspect</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}th{{text-align:left;padding-right:1em}}
figure{{margin:1em 0}}img{{max-width:100%}}figcaption{{color:#555;font-size:90%}}</style></head>
<body>
{chr(10).join(body)}
</body></html>
"""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
