"""vitlab: the Vision Transformer (Dosovitskiy et al., 2020), end to end on PyTorch."""
from .checkpoint import LoadedModel, save_model
from .config import BiTConfig, HybridConfig, ViTConfig
from .flops import count_flops
from .hub import create_model, list_pretrained, load_model, transform_for
from .inference import optimize
from .models import list_models, model_config
from .models.hybrid import HybridViT
from .models.resnet import ResNetV2
from .models.vit import VisionTransformer

__version__ = "0.1.0"

__all__ = [
    "BiTConfig", "HybridConfig", "HybridViT", "LoadedModel", "ResNetV2", "ViTConfig", "VisionTransformer",
    "count_flops", "create_model", "list_models", "list_pretrained", "load_model", "model_config", "optimize",
    "save_model", "transform_for"]
