"""What a ViT looks at: attention capture and rollout, the paper's Fig. 7 panels, an HTML report."""
from .capture import attention_modules, capture_attention
from .distance import attention_distance, mean_attention_distance, patch_distances
from .embeddings import embedding_filters, posemb_similarity
from .figures import plot_attention, plot_attention_distance, plot_embedding_filters, plot_posemb_similarity
from .images import find_images, load_images
from .report import inspect_checkpoint, model_card, write_report
from .rollout import attention_maps, attention_rollout, fuse_heads, token_grid, token_map

__all__ = [
    "attention_distance", "attention_maps", "attention_modules", "attention_rollout", "capture_attention",
    "embedding_filters", "find_images", "fuse_heads", "inspect_checkpoint", "load_images",
    "mean_attention_distance", "model_card", "patch_distances", "plot_attention", "plot_attention_distance",
    "plot_embedding_filters", "plot_posemb_similarity", "posemb_similarity", "token_grid", "token_map",
    "write_report",
]
