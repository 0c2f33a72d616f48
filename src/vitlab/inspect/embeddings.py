"""What the embeddings learned: position-embedding similarity and patch-filter principal components."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def posemb_similarity(posemb: torch.Tensor, grid: tuple[int, int], *, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Cosine similarity of every patch's position embedding to all others (paper Fig. 7 centre).

    ``posemb``: (1, prefix + M, D) or (prefix + M, D) -> (rows, cols, rows, cols): entry
    ``[i, j]`` is the similarity map of position (i, j) to every position.
    """
    table = posemb.detach().float().reshape(-1, posemb.shape[-1])[num_prefix_tokens:]
    if len(table) != grid[0] * grid[1]:
        raise ValueError(f"{len(table)} position embeddings do not fill a {grid[0]}x{grid[1]} grid")
    table = F.normalize(table, dim=-1)
    return (table @ table.T).reshape(*grid, *grid)


def embedding_filters(weight: torch.Tensor, num: int = 28) -> torch.Tensor:
    """Top principal components of the patch projection (paper Fig. 7 left): (D, C, P, P) -> (k, C, P, P).

    The D filters are centred and decomposed with an SVD; k = min(num, D - 1, C*P*P). Each
    component's sign is fixed so that its largest-magnitude entry is positive.
    """
    d = weight.shape[0]
    flat = weight.detach().float().reshape(d, -1)
    flat = flat - flat.mean(dim=0, keepdim=True)
    k = min(num, max(d - 1, 1), flat.shape[1])
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    comps = vh[:k]
    sign = comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)).sign()
    return (comps * sign).reshape(k, *weight.shape[1:])
