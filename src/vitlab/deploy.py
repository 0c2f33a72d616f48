"""Deployment on CPU runtimes: a vitlab model as ONNX (ONNX Runtime) or OpenVINO IR, fp32 or INT8.

An exported file carries what the model file carries (config, class names, preprocessing:
``checkpoint.model_metadata``), in ONNX ``metadata_props`` or OpenVINO ``rt_info`` under
``vitlab``, so ``load_exported`` gives a ``LoadedModel`` that ``predict`` and ``evaluate`` use as
they use the PyTorch one. INT8 is ONNX Runtime's dynamic quantisation (int8 weights, activations
quantised per batch; no calibration) or OpenVINO's post-training quantisation with NNCF on
calibration images (static, per-tensor activations). ``check_export`` measures what it cost.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import LoadedModel, atomic_write, model_metadata, parse_metadata
from .config import as_pair
from .interop.onnx_export import export_onnx

RUNTIMES = ("onnxruntime", "openvino")
SUFFIX_RUNTIME = {".onnx": "onnxruntime", ".xml": "openvino"}
METADATA_KEY = "vitlab"
CALIBRATION_IMAGES = 300  # NNCF's default subset size; a few hundred images calibrate a ViT's activations
INSTALL = "pip install 'vitlab[deploy]'"


def runtime_for(path: str | os.PathLike, runtime: str | None = None) -> str | None:
    """The runtime that runs ``path`` (``runtime`` if given; else by suffix); None for a PyTorch file."""
    if runtime not in (None, "auto", "torch"):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose one of torch, {', '.join(RUNTIMES)}")
        return runtime
    found = SUFFIX_RUNTIME.get(Path(path).suffix.lower())
    if runtime == "torch" and found:
        raise ValueError(f"{path} is an exported model: run it with --runtime {found}, not torch")
    return found


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ModuleNotFoundError(f"this needs {module}, which is not installed: {INSTALL}", name=module) from None


# --- export --------------------------------------------------------------------------------

def export(loaded: LoadedModel, dst: str | os.PathLike, *, to: str, int8: bool = False,
           calibration: torch.Tensor | None = None, dynamic_size: bool = False, check: bool = True) -> Path:
    """Write ``loaded`` to ``dst`` for runtime ``to`` (``onnxruntime`` or ``openvino``), INT8 if asked.

    ``calibration``: (N, C, H, W) preprocessed images for OpenVINO INT8 (ONNX Runtime's dynamic
    quantisation needs none). Any batch size runs; the file is written atomically. ONNX only:
    ``dynamic_size`` (any image size) and ``check`` (fp32 within 1e-4 of PyTorch, or an error).
    """
    model = copy.deepcopy(loaded.model).float().cpu().eval()
    metadata = model_metadata(model.cfg, loaded.class_names, loaded.meta)
    if to == "onnxruntime":
        return _export_onnx(model, Path(dst), metadata, int8=int8, dynamic_size=dynamic_size, check=check)
    if to == "openvino":
        if int8 and calibration is None:
            raise ValueError("OpenVINO INT8 calibrates on images: pass --data PATH (a few hundred of its images "
                             "are used)")
        return _export_openvino(model, Path(dst), metadata, calibration if int8 else None)
    raise ValueError(f"unknown runtime {to!r}; choose one of {', '.join(RUNTIMES)}")


def _export_onnx(model: nn.Module, dst: Path, metadata: dict[str, str], *, int8: bool, dynamic_size: bool,
                 check: bool) -> Path:
    onnx = _require("onnx")
    _require("onnxruntime")
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(model, fp32, dynamic_batch=True, dynamic_size=dynamic_size, check=check and not int8)
        source = fp32
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic
            from onnxruntime.quantization.shape_inference import quant_pre_process

            prepared, source = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(str(prepared), str(source), weight_type=QuantType.QInt8)
        proto = onnx.load(str(source))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        return atomic_write(dst, lambda path: onnx.save(proto, path))


def _export_openvino(model: nn.Module, dst: Path, metadata: dict[str, str],
                     calibration: torch.Tensor | None) -> Path:
    ov = _require("openvino")
    if dst.suffix != ".xml":
        raise ValueError(f"an OpenVINO model is a .xml file (and its .bin beside it), got {dst}")
    cfg = model.cfg
    example = torch.zeros(2, cfg.in_channels, *as_pair(cfg.image_size))
    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=example)
    ov_model.reshape([-1, cfg.in_channels, *as_pair(cfg.image_size)])  # any batch, the model's size
    if calibration is not None:
        nncf = _require("nncf")
        batches = [calibration[i:i + 1].numpy() for i in range(len(calibration))]
        # No SmoothQuant: with it the INT8 model's logits depend on the batch size (nncf 3.4,
        # openvino 2026.4: the CIFAR model's top-1 fell from 82% at batch 64 to 74% at batch 256).
        no_smoothing = nncf.AdvancedSmoothQuantParameters(matmul=-1)
        ov_model = nncf.quantize(ov_model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                                 subset_size=len(batches), advanced_parameters=nncf.AdvancedQuantizationParameters(
                                     smooth_quant_alphas=no_smoothing))
    ov_model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:  # .bin first, then .xml: a reader never
        xml = Path(tmp) / dst.name                            # sees a new .xml with an old .bin
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        os.replace(xml.with_suffix(".bin"), dst.with_suffix(".bin"))
        os.replace(xml, dst)
    return dst


# --- running -------------------------------------------------------------------------------

class ExportedModel(nn.Module):
    """An exported model called like the PyTorch one: images (B, C, H, W) -> logits (B, classes)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], cfg: Any, runtime: str, path: Path):
        super().__init__()
        self.run, self.cfg, self.runtime, self.path = run, cfg, runtime, path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.run(x.detach().float().cpu().numpy())))


def load_exported(path: str | os.PathLike, *, runtime: str | None = None, precision: str = "fp32",
                  threads: int | None = None) -> LoadedModel:
    """An exported file -> ``LoadedModel`` run by ``runtime`` (by suffix when None).

    ``precision``: OpenVINO's inference precision (``bf16`` uses AMX/AVX-512 bf16 where the CPU has
    them; ``fp32`` is exact); ONNX Runtime runs what the file holds. ``threads``: torch's by default.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist")
    runtime = runtime_for(path, runtime)
    threads = threads or torch.get_num_threads()
    if runtime == "onnxruntime":
        if precision != "fp32":
            raise ValueError(f"ONNX Runtime runs the file's own precision; drop --precision {precision} or export "
                             f"with --int8 (or use --runtime openvino for bf16)")
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for a bad file
            raise ValueError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err})") from None
        metadata = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        name = session.get_inputs()[0].name
        run = lambda x: session.run(None, {name: x})[0]  # noqa: E731
    else:
        ov = _require("openvino")
        core = ov.Core()
        try:
            ov_model = core.read_model(str(path))
        except Exception as err:
            raise ValueError(f"{path} is not a readable OpenVINO model ({type(err).__name__}: {err})") from None
        metadata = ov_model.get_rt_info([METADATA_KEY]).astype(str) if ov_model.has_rt_info([METADATA_KEY]) else None
        compiled = core.compile_model(ov_model, "CPU", {
            "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
            "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        run = lambda x: request.infer({0: x})[compiled.output(0)].copy()  # noqa: E731
    if metadata is None:
        raise ValueError(f"{path} has no vitlab metadata (class names, preprocessing); export it with `vitlab export`")
    try:
        fields = json.loads(metadata)
    except ValueError as err:
        raise ValueError(f"{path}: its vitlab metadata is not valid JSON ({err})") from None
    cfg, class_names, meta = parse_metadata(path, fields)
    return LoadedModel(ExportedModel(run, cfg, runtime, path), class_names, meta)


# --- what an export cost -------------------------------------------------------------------

@dataclass
class ExportCheck:
    """An exported model against the PyTorch fp32 one, on the same images."""

    images: int
    max_logit_diff: float
    agreement: float  # top-1 agreement with PyTorch fp32
    top1: float | None = None  # on labelled data: the exported model's accuracy
    reference_top1: float | None = None  # and PyTorch fp32's

    def line(self) -> str:
        text = (f"on {self.images} images: logits' max abs diff {self.max_logit_diff:.3g}, top-1 agreement "
                f"with PyTorch fp32 {100 * self.agreement:.2f}%")
        if self.top1 is not None:
            text += (f", top-1 {100 * self.top1:.2f}% (PyTorch fp32 {100 * self.reference_top1:.2f}%, "
                     f"{100 * (self.top1 - self.reference_top1):+.2f} points)")
        return text


def take(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` images of ``batches`` (0: all), as batches."""
    out, have = [], 0
    for x, y in batches:
        if n and have + len(x) > n:
            x, y = x[:n - have], y[:n - have]
        out.append((x, y))
        have += len(x)
        if n and have >= n:
            break
    return out


@torch.no_grad()
def check_export(reference: nn.Module, exported: nn.Module,
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> ExportCheck:
    """Max logit difference, top-1 agreement and (with labels) both accuracies over ``batches``
    (default: 8 random images, no labels)."""
    reference = copy.deepcopy(reference).float().cpu().eval()
    if batches is None:
        cfg = reference.cfg
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(8, cfg.in_channels, *as_pair(cfg.image_size), generator=g), None)]
    n, diff, agree, hits, ref_hits, labelled = 0, 0.0, 0, 0, 0, True
    for x, y in batches:
        want, got = reference(x.float()).float(), exported(x).float()
        diff = max(diff, float((got - want).abs().max()))
        agree += int((got.argmax(1) == want.argmax(1)).sum())
        if y is None:
            labelled = False
        else:
            hits += int((got.argmax(1) == y).sum())
            ref_hits += int((want.argmax(1) == y).sum())
        n += len(x)
    if n == 0:
        raise ValueError("nothing to check the export on: no images")
    return ExportCheck(n, diff, agree / n, hits / n if labelled else None, ref_hits / n if labelled else None)
