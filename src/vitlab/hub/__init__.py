"""Pretrained models by name: the catalog, downloads into a verified cache, labels and preprocessing.

>>> model = vitlab.create_model("vit_b16.augreg_in21k_ft_in1k", pretrained=True)
>>> x = vitlab.transform_for(model)(pil_image)[None]          # (1, 3, 224, 224)
>>> model.pretrained_cfg["class_names"][model(x).argmax()]

Official files come from ``$VITLAB_GCS_URL`` (default https://storage.googleapis.com), Hugging
Face repositories through ``huggingface_hub``; the cache is ``$VITLAB_HOME/hub``; ``VITLAB_OFFLINE=1``
never touches the network.
"""
from .cache import OfflineError, cached_files, home, offline, prune
from .catalog import Pretrained, default_tag, labels, list_pretrained, synsets
from .pretrained import (create_model, entry_for, fetch, import_file, is_pretrained_name, load_entry, load_model,
                         load_pretrained, model_file, transform_for)

__all__ = ["OfflineError", "Pretrained", "cached_files", "create_model", "default_tag", "entry_for", "fetch", "home", "import_file", "load_entry",
           "is_pretrained_name", "labels", "list_pretrained", "load_model", "load_pretrained", "model_file", "offline",
           "prune", "synsets", "transform_for"]
