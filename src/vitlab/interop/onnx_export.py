"""ONNX export with ``torch.onnx.export`` (the torch.export-based exporter, ``dynamo=True``, the
default since PyTorch 2.9; it needs onnxscript), checked against PyTorch with onnxruntime.

A dynamic image size needs the position embeddings resampled inside the graph: ``AnySize``
does what ``model.set_image_size`` does (same interpolation), on the grid of each input.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_write
from ..config import as_pair
from ..models.posemb import sincos_2d
from ..models.vit import VisionTransformer


class AnySize(nn.Module):
    """A ViT whose position embeddings follow the input's patch grid (for a dynamic-size graph)."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, cfg = self.model, self.model.cfg
        x = m.patch_embed.grid(x)  # (B, D, gh, gw)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        prefix = cfg.num_prefix_tokens
        gh, gw = cfg.grid_size
        pos = m.pos_embed[:, prefix:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # (1, D, gh, gw)
        if cfg.posemb == "sincos2d":  # recomputed for the grid, as set_image_size does
            x = x + sincos_2d(tuple(grid), cfg.width).to(x)
        else:
            if cfg.posemb_mode == "scipy":
                pos = F.interpolate(pos, size=grid, mode="bilinear", align_corners=True)
            else:
                pos = F.interpolate(pos, size=grid, mode=cfg.posemb_mode, align_corners=False)
            x = x + pos.flatten(2).transpose(1, 2)
        if m.cls_token is not None:
            cls = m.cls_token + m.pos_embed[:, :prefix]
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        for block in m.blocks:
            x = block(x)
        return m.forward_head(m.pool(m.norm(x)))


def export_onnx(model: VisionTransformer, path: str | os.PathLike, *, dynamic_batch: bool = False,
                dynamic_size: bool = False, batch_size: int = 2, check: bool = True, atol: float = 1e-4) -> float:
    """Write ``model`` as ONNX (input ``images`` (B, C, H, W) -> ``logits``) and return the largest
    absolute difference from PyTorch measured with onnxruntime (NaN when ``check`` is False).

    ``dynamic_size`` also checks a second input size against ``model.set_image_size``.
    """
    model = copy.deepcopy(model).float().cpu().eval()
    cfg = model.cfg
    h, w = as_pair(cfg.image_size)
    x = torch.randn(batch_size, cfg.in_channels, h, w, generator=torch.Generator().manual_seed(0))
    dims: dict[int, torch.export.Dim] = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=4096)
    if dynamic_size:
        if getattr(cfg, "conv_stem", ()):
            raise ValueError(f"a dynamic-size ONNX graph of a model with conv_stem={cfg.conv_stem} is not supported "
                             f"(torch.export fixes the stem's sizes); export it without --dynamic-size")
        p = cfg.patch_size
        dims[2] = p * torch.export.Dim("grid_h", min=1, max=4096 // p)
        dims[3] = p * torch.export.Dim("grid_w", min=1, max=4096 // p)
    module = AnySize(model).eval() if dynamic_size else model

    # Protobuf caps one file at 2 GiB: bigger models keep their weights in a side file (not atomic then).
    external = sum(p.numel() for p in model.parameters()) * 4 > 1.8 * 2**30

    def write(tmp: str) -> None:
        with torch.no_grad():
            torch.onnx.export(module, (x,), tmp, dynamo=True, external_data=external, input_names=["images"],
                              output_names=["logits"], dynamic_shapes=(dims,) if dims else None, verbose=False)
    path = Path(path)
    if external:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(str(path))
    else:
        atomic_write(path, write)
    if not check:
        return float("nan")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ValueError("checking the ONNX file needs onnxruntime (pip install onnxruntime); "
                         "or skip the check") from err
    inputs = [x]
    if dynamic_batch:
        inputs.append(torch.randn(batch_size + 1, cfg.in_channels, h, w))
    if dynamic_size:
        inputs.append(torch.randn(1, cfg.in_channels, h + cfg.patch_size, w + 2 * cfg.patch_size))
    diff = max(_max_diff(model, path, i) for i in inputs)
    if diff > atol:
        raise ValueError(f"ONNX export of {path} differs from PyTorch by {diff:.3g} > {atol:g}")
    return diff


def _max_diff(model: VisionTransformer, path: Path, x: torch.Tensor) -> float:
    """Largest |onnxruntime - PyTorch| on input ``x`` (PyTorch resampled to ``x``'s size if needed)."""
    import onnxruntime as ort

    if tuple(x.shape[-2:]) != as_pair(model.cfg.image_size):
        model = copy.deepcopy(model)
        model.set_image_size(tuple(x.shape[-2:]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        want = model(x)
    return float((torch.from_numpy(got) - want).abs().max())
