"""vitlab: the Vision Transformer (Dosovitskiy et al., 2020), end to end on PyTorch."""
from .checkpoint import LoadedModel, load_model, save_model
from .config import ViTConfig
from .flops import count_flops
from .inference import optimize
from .models import create_model, list_models, model_config
from .models.vit import VisionTransformer

__version__ = "0.1.0"

__all__ = [
    "LoadedModel", "load_model", "save_model","ViTConfig", "VisionTransformer", "count_flops", "create_model", "list_models", "model_config", "optimize"]
