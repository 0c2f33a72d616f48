"""CPU fast paths, applied to a built model: ``accelerate(model)`` (training and inference) and
``optimize(model, dtype)`` (inference: accelerate, eval, no gradients, weights cast once).

The model files define the plain computation. ``accelerate`` swaps the classes of a model's
patch embedding, attention, MLP and blocks for the subclasses below, which compute the same
function faster on CPUs (the parameters, their names and the state dict are unchanged):
- attention: SDPA where it is the fastest kernel, else two batched matmuls (:func:`sdpa_is_faster`);
- a conv stem on channels-last images, oneDNN's native layout;
- bf16 inference: the bias, GELU and residual add fused into oneDNN's linear (:func:`fused_linear`).
Each was measured (benchmarks/speed/); ``fused_attention=False`` keeps the explicit softmax
(what inspection hooks see) in any case.
"""
from __future__ import annotations

import torch
from torch import nn

from .models.vit import Attention, Block, Mlp, PatchEmbed

# A conv stem runs on channels-last (NHWC) images on CPUs, oneDNN's native layout: the cifar10
# recipe's training step 1.04x / 1.06x / 1.15x faster at 16 / 24 / 32 px (benchmarks/speed/recipe_step.py).
STEM_CHANNELS_LAST = True


def sdpa_is_faster(x: torch.Tensor) -> bool:
    """Whether SDPA's fused kernels beat :func:`matmul_attention` on ``x`` (a rule, not a timing).

    GPUs: always. CPUs (measured on AVX-512/bf16 Zen 4): in fp32 only; in bf16 (or under
    autocast) the CPU flash kernel is 1.5-2x slower forward and up to 5x slower backward.
    """
    return x.device.type != "cpu" or (x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     dropout: nn.Module) -> torch.Tensor:
    """softmax(q k^T * scale) v as two batched matmuls, the scale folded into the first.

    q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim).
    """
    b, h, n, d = q.shape
    q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))
    scores = torch.baddbmm(q.new_empty(1, 1, 1), q, k.transpose(1, 2), beta=0.0, alpha=scale)  # (B*heads, N, N)
    # Without autograd the weights overwrite the scores: one (B*heads, N, N) buffer fewer at the peak.
    weights = scores.softmax(dim=-1) if scores.requires_grad else torch.softmax(scores, -1, out=scores)
    return torch.bmm(dropout(weights), v).view(b, h, n, d)


def fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`fused_linear` applies: bf16 inference on CPU (no autograd, no autocast), ``x``
    in the weights' dtype. (fp32 keeps the eager ops: not measured fused.)"""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.is_available())


def fused_linear(x: torch.Tensor, layer: nn.Linear, *, gelu: str | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x)``, ``gelu(layer(x))`` or ``residual + layer(x)`` as one oneDNN kernel: bias,
    activation and add applied to the fp32 accumulator, rounded once (no separate bias copy as in
    ``addmm``). Inference only (no backward); see :func:`fusable`."""
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, layer.weight, layer.bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu" if gelu else "none", [], gelu or "")


class FastPatchEmbed(PatchEmbed):
    """The conv stem on channels-last images on CPU."""

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem and STEM_CHANNELS_LAST and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # (B, C, H, W) in NHWC memory order
        return super().grid(x)


class FastLinear(nn.Linear):
    """``fused_linear`` where it applies (bf16 CPU inference), else the plain layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_linear(x, self) if fusable(x, self.weight) else super().forward(x)


class FastAttention(Attention):
    """Attention on the fastest kernel for the input (``fused_attention``); with ``residual`` (bf16
    CPU inference) returns ``residual + attention(x)``, the add fused into the output projection."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.fused and not sdpa_is_faster(q):
            if self.local:  # LSA's masked scores in two matmuls (SDPA with a mask is slower still)
                return self.attn_drop(self.scores(q, k).softmax(dim=-1)) @ v
            return matmul_attention(q, k, v, self.scale, self.attn_drop)
        return super().attend(q, k, v)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return super().forward(x)
        b, n, d = x.shape
        out = self.attend(*self.qkv_heads(x)).transpose(1, 2).reshape(b, n, d)
        return fused_linear(out, self.proj, residual=residual)


class FastMlp(Mlp):
    """With ``residual`` (bf16 CPU inference) returns ``residual + mlp(x)``, bias+GELU and the add
    fused into the matmuls."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return super().forward(x)
        return fused_linear(fused_linear(x, self.fc1, gelu=self.act.approximate), self.fc2, residual=residual)


class FastBlock(Block):
    """bf16 CPU inference: each residual add fused into the projection before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fusable(x, self.mlp.fc1.weight) and not self.training and isinstance(self.ls1, nn.Identity):
            x = self.attn(self.norm1(x), residual=x)  # dropouts are identities in eval
            return self.mlp(self.norm2(x), residual=x)
        return super().forward(x)


FAST = {PatchEmbed: FastPatchEmbed, Attention: FastAttention, Mlp: FastMlp, Block: FastBlock}


def accelerate(model: nn.Module) -> nn.Module:
    """Give ``model``'s ViT parts their CPU fast paths, in place (idempotent); returns it."""
    for module in model.modules():
        module.__class__ = FAST.get(type(module), type(module))
        if isinstance(module, Attention) and type(module.qkv) is nn.Linear:
            module.qkv.__class__ = FastLinear
    return model


def optimize(model: nn.Module, dtype: torch.dtype | None = None, *, device: torch.device | str | None = None) -> nn.Module:
    """Prepare ``model`` for inference in place and return it.

    Applies :func:`accelerate`, sets eval mode, turns off ``requires_grad`` (so attention picks its
    inference kernels even outside ``torch.no_grad()``) and casts the weights once to ``dtype``
    (e.g. ``torch.bfloat16``) on ``device``, so no cast happens per call as under autocast. Inputs
    are cast to the weights' dtype by the patch embedding, so fp32 images can be passed as they
    are. (``torch.compile`` with inductor's weight freezing on top was measured and is not faster
    at 2 threads: benchmarks/speed/.)
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype such as torch.bfloat16, got {dtype}")
    return accelerate(model).to(device=device, dtype=dtype).eval().requires_grad_(False)
