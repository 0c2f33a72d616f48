"""Data: CIFAR and image folders, preprocessing, augmentation, deterministic loaders."""
from .build import Data, build_data
from .config import DataConfig
from .datasets import ArrayDataset, ImageFolderDataset
from .download import CIFAR_ARCHIVES, Archive, ensure_archive
from .images import IMAGE_EXTENSIONS, Preprocess, eval_transform, find_images, load_image
from .loader import Loader

__all__ = [
    "Archive", "ArrayDataset", "CIFAR_ARCHIVES", "Data", "DataConfig", "IMAGE_EXTENSIONS",
    "ImageFolderDataset", "Loader", "Preprocess", "build_data", "ensure_archive", "eval_transform", "find_images", "load_image",
]
