"""The Vision Transformer (Dosovitskiy et al., 2020), in one file.

Image -> P x P patches -> linear projection -> prepend [class] -> add learned position
embeddings -> pre-norm Transformer encoder -> final LayerNorm -> pool -> head.
big_vision's variants too: fixed sin-cos position embeddings, attention pooling (MAP); and the
small-data options: a conv stem, shifted patches and locality self-attention (SPT/LSA), sequence
pooling (CCT), layer scale.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ViTConfig, as_pair, replace_checked
from .layers import DropPath, LayerScale, check_images, drop_patches, zero_head
from .posemb import resample_posemb, sincos_posemb

# The paper's Table 1, plus smaller widths for small images: width, depth, mlp_dim, heads.
VARIANTS: dict[str, dict[str, int]] = {
    "Mu": dict(width=128, depth=6, mlp_dim=256, num_heads=4),  # micro: tests and demos
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}


def vit_config(variant: str, **overrides) -> ViTConfig:
    """``vit_config("B/16")`` -> the ViT-B/16 config; ``overrides`` replace any field."""
    size, patch = variant.split("/")
    return replace_checked(ViTConfig(**VARIANTS[size], patch_size=int(patch)), **overrides)


class PatchEmbed(nn.Module):
    """Flatten P x P patches and project them linearly (a strided conv is the same map).

    With ``cfg.conv_stem`` 3x3 convolutions (BatchNorm, ReLU) cut the patches (stride 2 until
    the grid is reached, then stride 1) and the projection is 1x1 (Xiao et al. 2021). With
    ``cfg.shifted_patches`` (SPT, Lee et al. 2021) the image and its four diagonal shifts by P/2
    are cut into patches of 5 C P^2 values, layer-normalised and projected by a Linear.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_size = p = cfg.patch_size
        self.in_channels = cin = cfg.in_channels
        layers: list[nn.Module] = []
        for stride, channels in zip(stem_strides(cfg), cfg.conv_stem):  # stride 2 halves H and W
            layers += [nn.Conv2d(cin, channels, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True)]
            cin = channels
        self.stem = nn.Sequential(*layers)  # empty: the identity
        self.shifted = cfg.shifted_patches
        if self.shifted:
            self.norm = nn.LayerNorm(5 * cin * p * p, eps=cfg.layer_norm_eps)
            self.proj = nn.Linear(5 * cin * p * p, cfg.width)
        else:
            k = 1 if cfg.conv_stem else p
            self.proj = nn.Conv2d(cin, cfg.width, kernel_size=k, stride=k)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> token grid (B, D, H/P, W/P)."""
        check_images(x, self.in_channels, self.patch_size, f"patch size {self.patch_size}")
        if self.shifted:
            return self.shifted_grid(x)
        return self.proj(self.stem(x))

    def shifted_grid(self, x: torch.Tensor) -> torch.Tensor:
        """SPT: (B, C, H, W) -> [x and x shifted by (+-P/2, +-P/2), zero-filled] (B, 5C, H, W) -> patches
        (B, H/P, W/P, 5 C P^2) -> LayerNorm, Linear -> (B, D, H/P, W/P)."""
        patches = F.pixel_unshuffle(shifted_views(x, self.patch_size // 2), self.patch_size)  # (B, 5 C P^2, h, w)
        return self.proj(self.norm(patches.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


def shifted_views(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, 5C, H, W): ``x`` and ``x`` moved by s pixels right-down, left-down,
    right-up and left-up, zero-filled (SPT's inputs)."""
    return torch.cat([x, *(F.pad(x, (dx, -dx, dy, -dy)) for dx, dy in ((s, s), (-s, s), (s, -s), (-s, -s)))], dim=1)


def stem_strides(cfg: ViTConfig) -> list[int]:
    """Strides of the conv stem: 2 for the first log2(patch_size) convolutions, then 1."""
    halvings = cfg.patch_size.bit_length() - 1
    return [2 if i < halvings else 1 for i in range(len(cfg.conv_stem))]


class Attention(nn.Module):
    """Multi-head self-attention: fused (PyTorch's SDPA), or an explicit softmax.

    ``fused=False`` runs the explicit path, whose weights pass through ``attn_drop`` (where
    hooks see them) and are what :meth:`attention_weights` returns. ``locality_attention`` (LSA,
    Lee et al. 2021): a learned temperature per head replaces 1/sqrt(d), and no token attends to itself.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.width // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.fused = cfg.fused_attention
        self.local = cfg.locality_attention
        if self.local:  # (heads,), initialised to the usual scale
            self.temperature = nn.Parameter(torch.full((cfg.num_heads,), self.scale))
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        self.attn_drop = nn.Dropout(cfg.attention_dropout)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q, k, v, each (B, heads, N, head_dim)."""
        b, n, d = x.shape
        return self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q k^T / sqrt(d), or LSA's q k^T * temperature with the diagonal at -inf: (B, heads, N, N)."""
        if not self.local:
            return (q * self.scale) @ k.transpose(-2, -1)
        s = (q * self.temperature.view(-1, 1, 1)) @ k.transpose(-2, -1)
        return s.masked_fill(torch.eye(s.shape[-1], dtype=torch.bool, device=s.device), float("-inf"))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The explicit path's softmax(q k^T / sqrt(d)): (B, N, D) -> (B, heads, N, N)."""
        q, k, _ = self.qkv_heads(x)
        return self.scores(q, k).softmax(dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v, dropout on the weights: (B, heads, N, head_dim) -> the same."""
        if self.fused:
            p = self.attn_drop.p if self.training else 0.0
            if not self.local:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            n = q.shape[-2]
            off_diagonal = ~torch.eye(n, dtype=torch.bool, device=q.device)
            return F.scaled_dot_product_attention(q * self.temperature.view(-1, 1, 1), k, v, attn_mask=off_diagonal,
                                                  dropout_p=p, scale=1.0)
        return self.attn_drop(self.scores(q, k).softmax(dim=-1)) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        out = self.attend(*self.qkv_heads(x))  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.act = nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none")
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision's ``MAPHead``; timm's ``attn_pool`` names): a
    learned probe ``latent`` attends to the tokens (query from the probe, keys and values from
    the tokens), then y + MLP(LN(y)). (B, N, D) -> (B, D)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.width
        self.num_heads = cfg.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)  # rows: keys, then values
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def init_weights(self) -> None:
        """big_vision's: xavier-uniform probe and kernels (q, k, v each D x D), MLP biases near 0."""
        d = self.latent.shape[-1]
        nn.init.uniform_(self.latent, -math.sqrt(6 / (1 + d)), math.sqrt(6 / (1 + d)))
        for w in (self.q.weight, *self.kv.weight.chunk(2), self.proj.weight, self.mlp.fc1.weight, self.mlp.fc2.weight):
            nn.init.xavier_uniform_(w)
        for b in (self.q.bias, self.kv.bias, self.proj.bias):
            nn.init.zeros_(b)
        nn.init.normal_(self.mlp.fc1.bias, std=1e-6)
        nn.init.normal_(self.mlp.fc2.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(self.latent).reshape(1, 1, h, d // h).transpose(1, 2).expand(b, -1, -1, -1)  # (B, heads, 1, hd)
        k, v = self.kv(x).reshape(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, N, hd)
        y = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d))
        return (y + self.mlp(self.norm(y)))[:, 0]


class SeqPool(nn.Module):
    """CCT's sequence pooling (Hassani et al. 2021): tokens weighted by softmax over a learned
    linear score. (B, N, D) -> (B, D)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.score = nn.Linear(cfg.width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.score(x).softmax(dim=1).transpose(1, 2) @ x)[:, 0]  # (B, 1, N) @ (B, N, D)


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x)); with ``layer_scale`` each
    branch is scaled per channel before the add."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        self.drop_path = DropPath(drop_path)
        self.ls1 = LayerScale(cfg.width, cfg.layer_scale) if cfg.layer_scale else nn.Identity()
        self.ls2 = LayerScale(cfg.width, cfg.layer_scale) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.drop(self.attn(self.norm1(x)))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT with timm-style seams: ``forward_features`` -> ``pool`` -> ``forward_head``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = self._make_patch_embed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        if cfg.posemb == "sincos2d":  # a buffer: not trained, but saved and exported like the learned one
            self.register_buffer("pos_embed", sincos_posemb(cfg.grid_size, d, cfg.num_prefix_tokens))
        else:
            self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_prefix_tokens + cfg.num_patches, d))
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn_pool = MAPHead(cfg) if cfg.pool == "map" else SeqPool(cfg) if cfg.pool == "seq" else None
        self.pre_logits = self._make_pre_logits(cfg)
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = zero_head(cfg.representation_size or d, cfg.num_classes)
        if not self.pos_embed.is_meta:  # on the meta device there are only shapes: nothing to initialise
            self.init_weights()

    @staticmethod
    def _make_patch_embed(cfg: ViTConfig) -> nn.Module:
        """Images -> (B, N, D) tokens; the hybrid overrides this with a ResNet."""
        return PatchEmbed(cfg)

    @staticmethod
    def _make_pre_logits(cfg: ViTConfig) -> nn.Module:
        if not cfg.representation_size:
            return nn.Identity()
        return nn.Sequential(nn.Linear(cfg.width, cfg.representation_size), nn.Tanh())

    @property
    def num_features(self) -> int:
        """Width of ``pre_logits`` (the input of the head)."""
        return self.cfg.representation_size or self.cfg.width

    def init_weights(self) -> None:
        """The official code's initialisation (lecun-normal patches, xavier dense, zero head)."""
        fan_in = self.patch_embed.proj.weight[0].numel()  # C x P x P (or the stem's channels x 1 x 1)
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=math.sqrt(1 / fan_in) / 0.87962566)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        if isinstance(self.attn_pool, MAPHead):
            self.attn_pool.init_weights()
        for block in self.blocks:
            qkv = block.attn.qkv.weight
            bound = math.sqrt(6.0 / (qkv.shape[0] // 3 + qkv.shape[1]))  # q, k, v each D x D
            nn.init.uniform_(qkv, -bound, bound)
            for lin in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(lin.weight)
            for bias in (block.attn.qkv.bias, block.attn.proj.bias):
                if bias is not None:
                    nn.init.zeros_(bias)
            nn.init.normal_(block.mlp.fc1.bias, std=1e-6)
            nn.init.normal_(block.mlp.fc2.bias, std=1e-6)
            for ls in (block.ls1, block.ls2):
                if isinstance(ls, LayerScale):
                    nn.init.constant_(ls.gamma, self.cfg.layer_scale)
        if isinstance(self.pre_logits, nn.Sequential):
            lin = self.pre_logits[0]
            nn.init.trunc_normal_(lin.weight, std=math.sqrt(1 / lin.in_features) / 0.87962566)
            nn.init.zeros_(lin.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # --- seams -------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens with position embeddings (B, prefix + N, D)."""
        h, w = x.shape[-2:] if x.ndim == 4 else (None, None)
        x = self.patch_embed(x.to(self.pos_embed.dtype))  # validates rank, channels, divisibility
        return self.add_posemb(x, (h, w))

    def add_posemb(self, x: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, N, D) of images of ``image_size`` -> [class] + tokens + posemb (B, prefix + N, D)."""
        h, w = image_size
        expected = as_pair(self.cfg.image_size)
        pos_embed = self.pos_embed
        if (h, w) != expected:
            if not self.cfg.dynamic_image_size:
                raise ValueError(
                    f"expected {expected[0]}x{expected[1]} images, got {h}x{w}; "
                    f"call model.set_image_size(({h}, {w})) to resample the position embeddings"
                )
            # Resampled in the graph, so gradients reach the stored grid.
            pos_embed = self._posemb_at(pos_embed, replace_checked(self.cfg, image_size=(h, w)).grid_size)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed)

    def _posemb_at(self, pos_embed: torch.Tensor, grid: tuple[int, int], mode: str | None = None) -> torch.Tensor:
        """Position embeddings for ``grid``: the sin-cos table there, or ``pos_embed`` resampled."""
        if self.cfg.posemb == "sincos2d":
            return sincos_posemb(grid, self.cfg.width, self.cfg.num_prefix_tokens).to(pos_embed)
        return resample_posemb(pos_embed, grid, num_prefix_tokens=self.cfg.num_prefix_tokens,
                               old_grid=self.cfg.grid_size, mode=mode or self.cfg.posemb_mode)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> encoded tokens after the final norm (B, prefix + N, D).

        In training with ``patch_dropout`` only a random subset of the N patch tokens goes on.
        """
        x = self.embed(x)
        if self.training and self.cfg.patch_dropout:
            x = drop_patches(x, self.cfg.patch_dropout, self.cfg.num_prefix_tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, D) -> (B, D): the [class] token, the mean of the patch tokens, or their
        attention (``pool="map"``) or sequence (``pool="seq"``) pooling."""
        if self.cfg.pool == "token":
            return tokens[:, 0]
        if self.attn_pool is not None:
            return self.attn_pool(tokens[:, self.cfg.num_prefix_tokens :])
        return tokens[:, self.cfg.num_prefix_tokens :].mean(dim=1)

    def forward_head(self, pooled: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        """(B, D) -> pre-logits (B, R) if ``pre_logits`` else logits (B, classes)."""
        x = self.pre_logits(pooled)
        return x if pre_logits else self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.pool(self.forward_features(x)))

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named intermediates: stem, with_posemb, block_00.., encoded, head_input, pre_logits, logits."""
        x = x.to(self.pos_embed.dtype)  # fp32 images work with bf16 weights (vitlab.optimize)
        out: dict[str, torch.Tensor] = {"stem": self.patch_embed(x)}
        out["with_posemb"] = x = self.add_posemb(out["stem"], x.shape[-2:])
        for i, block in enumerate(self.blocks):
            x = block(x)
            out[f"block_{i:02d}"] = x
        out["encoded"] = x = self.norm(x)
        out["head_input"] = x = self.pool(x)
        out["pre_logits"] = x = self.forward_head(x, pre_logits=True)
        out["logits"] = self.head(x)
        return out

    # --- surgery -----------------------------------------------------------------------
    def reset_head(self, num_classes: int, *, keep_pre_logits: bool = True) -> None:
        """A fresh zero-initialised head for ``num_classes`` (0 gives an identity head)."""
        ref = next(self.parameters())
        if not keep_pre_logits and self.cfg.representation_size:
            self.pre_logits = nn.Identity()
            self.cfg = dataclasses.replace(self.cfg, representation_size=None)
        self.head = zero_head(self.num_features, num_classes, like=ref)
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)

    def set_image_size(self, image_size: int | tuple[int, int], mode: str | None = None) -> None:
        """Resample the position embeddings for a new input size (class token kept); a sin-cos
        table is recomputed for the new grid."""
        new_cfg = replace_checked(self.cfg, image_size=image_size)
        posemb = self._posemb_at(self.pos_embed.data, new_cfg.grid_size, mode)
        self.pos_embed = posemb if self.cfg.posemb == "sincos2d" else nn.Parameter(posemb)
        self.cfg = new_cfg

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and norms."""
        return {"pos_embed", "cls_token"} | ({"attn_pool.latent"} if isinstance(self.attn_pool, MAPHead) else set())
