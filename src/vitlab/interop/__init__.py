"""Interop: the official / big_vision / BiT ``.npz`` files, timm state dicts and Hugging Face folders
in and out (ViT, R50+ViT hybrid, BiT ResNet) through one declarative key map per format, and ONNX
export checked with onnxruntime."""
from .convert import FORMATS, convert, export_format, export_model, import_model
from .keymap import Entry, ImportReport
from .onnx_export import export_onnx

__all__ = ["FORMATS", "Entry", "ImportReport", "convert", "export_format", "export_model", "export_onnx",
           "import_model"]
