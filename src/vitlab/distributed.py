"""Distribution on PyTorch's own engine: torchrun's environment, the process group, parallelize.

Every process runs the same program (``torchrun --nproc-per-node N -m vitlab train ...``).
``init_distributed`` reads torchrun's environment and joins the process group (gloo on CPU,
nccl on CUDA) with a timeout, so a rank that dies or hangs ends the job with an error instead
of a hang. ``parallelize`` is applied once to a plain, built model: DDP, or FSDP2
(``fully_shard`` per encoder block, then the root) with ``shard=True``, optionally with
activation checkpointing per block. The model classes hold no distributed code.

Checkpoints are world-size independent: ``model_state``/``optimizer_state`` return full,
unsharded CPU tensors keyed by parameter name (without DDP's ``module.`` or the checkpoint
wrapper's prefix) on rank 0, and ``load_model_state``/``load_optimizer_state`` put them back
into a model of any world size or wrapping. Evaluation sums exact totals with
``sum_across_ranks``; ``extract_features`` computes features of a dataset on all ranks and
returns them in the dataset's order, each item exactly once.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from .data import Loader

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0, on CPU


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that prints, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def read_env(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun's variables; ``(0, 0, 1)`` without them."""
    world_size = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local_rank = _env_int(environ, "LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} do not fit; launch with torchrun")
    if world_size > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset; launch with torchrun")
    return rank, local_rank, world_size


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``"auto"`` (CUDA when present) or ``"cuda"`` -> this process's GPU ``cuda:LOCAL_RANK``; or cpu.

    One process may name its GPU (``cuda:1``); under torchrun each process takes its own.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from err
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    if device.index is not None:
        if world_size > 1:
            raise ValueError(f"device {name!r}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda")
        return device
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                         f"use --nproc-per-node {torch.cuda.device_count()} or fewer")
    return torch.device("cuda", local_rank)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on CPU or CUDA, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def init_distributed(device: str = "auto", *, timeout_s: float = 600.0) -> DistEnv:
    """Read torchrun's environment, pick the device, and join the process group if N > 1.

    A collective that waits longer than ``timeout_s`` raises (gloo) or aborts the process
    (nccl, with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``); torchrun then stops the other workers
    and exits non-zero. A single process needs no launcher and joins no group.
    """
    rank, local_rank, world_size = read_env()
    dev = resolve_device(device, local_rank, world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # tear down on a timeout
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank tears it down under another)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 (torchrun's ``RANK``) or in a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushed, so torchrun shows lines as they come)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable value) on every rank, e.g. a number of steps."""
    if not env.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    """Wait for all ranks (nothing without a process group)."""
    if dist.is_initialized():
        dist.barrier()


# --- parallelize -----------------------------------------------------------------------
def _block_lists(model: nn.Module) -> list[nn.ModuleList | nn.Sequential]:
    """Where the repeated units are: a ViT's ``blocks``, or the stages of residual units of a ResNet."""
    blocks, stages = getattr(model, "blocks", None), getattr(model, "stages", None)
    if isinstance(blocks, nn.ModuleList):
        return [blocks]
    if isinstance(stages, nn.ModuleList) and all(isinstance(stage, nn.Sequential) for stage in stages):
        return list(stages)
    raise ValueError(f"{type(model).__name__} has no `blocks` (or `stages` of units) to checkpoint or shard per block")


def checkpoint_blocks(model: nn.Module) -> None:
    """Wrap each block so its activations are recomputed in backward (state-dict keys unchanged)."""
    for blocks in _block_lists(model):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)


def broadcast_module(model: nn.Module, device: torch.device, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank, one tensor at a time."""
    for tensor in [*model.parameters(), *model.buffers()]:
        buf = tensor.detach().to(device)
        dist.broadcast(buf, src)
        tensor.data.copy_(buf)


def parallelize(model: nn.Module, env: DistEnv, *, shard: bool = False,
                activation_checkpointing: bool = False) -> nn.Module:
    """Activation checkpointing per block, then DDP, or FSDP2 with ``shard``; one process: just move.

    Call once, after the model is built and before the optimiser is created (FSDP2 replaces
    the parameters with sharded ones). A model with no trainable parameter (an EMA copy) is
    replicated without DDP, or sharded like the model. ``unwrap`` reaches the plain model.
    """
    if activation_checkpointing:
        checkpoint_blocks(model)
    if not env.distributed:
        return model.to(env.device)
    if shard:
        broadcast_module(model, env.device)  # fully_shard keeps each rank's own initial values
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for blocks in _block_lists(model):
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: the rest (embeddings, final norm, head)
        return model
    model.to(env.device)
    if not any(p.requires_grad for p in model.parameters()):
        broadcast_module(model, env.device)
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)  # broadcasts rank 0's weights


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Whether the next backward all-reduces gradients: False on all but the last micro-batch."""
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = sync
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (FSDP2 and checkpoint wrappers keep the model's class API)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# --- world-size independent checkpoints --------------------------------------------------
def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU weights keyed by the plain model's names; empty on ranks other than 0.

    Like ``state_dict()``, tensors may share storage with the live model: save or copy them.
    """
    return get_model_state_dict(model, options=_FULL)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Load full weights (from ``model_state``) into a plain, DDP or sharded model; every rank.

    A missing, unexpected or misshapen key is a ValueError naming it. Takes ownership of
    ``state``: its entries may be replaced or reused by the model.
    """
    own = get_model_state_dict(model)  # local views; a shard's .shape is the full shape
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}; is it a checkpoint of another architecture?")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{source} does not fit this model: {key} has shape {tuple(value.shape)} in the "
                             f"{source} but {tuple(own[key].shape)} in the model; is it a checkpoint of another architecture?")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full CPU optimiser state keyed by parameter name; empty on ranks other than 0.

    Like ``state_dict()``, tensors may share storage with the live optimiser: save or copy them.
    """
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load optimiser state from ``optimizer_state`` (any world size or sharding); every rank.

    Takes ownership of ``state``: the optimiser may keep and update its tensors in place.
    """
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# --- exact totals and ordered gathers ------------------------------------------------------
def _all_reduce(values: Sequence[float] | torch.Tensor, env: DistEnv, op: dist.ReduceOp) -> torch.Tensor:
    totals = torch.as_tensor(values, dtype=torch.float64).clone()
    if env.distributed:
        buf = totals.to(env.device)
        dist.all_reduce(buf, op=op)
        totals = buf.cpu()
    return totals


def sum_across_ranks(values: Sequence[float] | torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Element-wise sum over ranks of per-rank totals (float64 on CPU), e.g. ``[correct, count]``.

    Exact (integers up to 2**53) as long as each rank counts only the items it owns.
    """
    return _all_reduce(values, env, dist.ReduceOp.SUM)


def max_across_ranks(values: Sequence[float] | torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Element-wise maximum over ranks (float64 on CPU), e.g. a signal number all ranks act on."""
    return _all_reduce(values, env, dist.ReduceOp.MAX)


def even_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_batches: int,
                 env: DistEnv) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``num_batches`` batches, then empty ones until every rank has yielded as many.

    A sharded model all-gathers its weights in every forward, so all ranks must run the same
    number of forwards; an empty batch (0 images) counts nothing in any total.
    """
    most, minus_fewest = max_across_ranks([num_batches, -num_batches], env).long().tolist()
    batches = iter(batches)
    first = next(batches, None)
    empty = None if first is None else tuple(t[:0] for t in first)
    if minus_fewest == 0 and most > 0:  # a rank owns no batch: it borrows the shapes, before any forward
        shapes: list[Any] = [None] * env.world_size
        dist.all_gather_object(shapes, None if empty is None else [(t.shape, t.dtype) for t in empty])
        empty = tuple(torch.empty(shape, dtype=dtype) for shape, dtype in next(s for s in shapes if s))
    if first is not None:
        yield first
        yield from batches
    for _ in range(most - num_batches):
        yield empty  # type: ignore[misc]


def rank_indices(num_items: int, env: DistEnv) -> range:
    """The items this rank owns: ``rank, rank + W, rank + 2W, ...`` (disjoint, no padding)."""
    return range(env.rank, num_items, env.world_size)


def gather_rows(local: torch.Tensor | None, num_items: int, env: DistEnv) -> torch.Tensor:
    """Rows for ``rank_indices`` from every rank -> all ``num_items`` rows in order, on every rank.

    ``local`` is (n_r, ...) with n_r = len(rank_indices(num_items, env)) (``None`` if n_r = 0);
    returns (num_items, ...) on CPU. Shorter shares are padded for the collective only.
    """
    owned = len(rank_indices(num_items, env))
    if (0 if local is None else len(local)) != owned:
        raise ValueError(f"rank {env.rank} has {0 if local is None else len(local)} rows but owns {owned} "
                         f"of {num_items} items; were items skipped or batches dropped?")
    if not env.distributed:
        return local.cpu() if local is not None else torch.empty(0)
    shapes: list[Any] = [None] * env.world_size  # a rank that owns nothing learns the row shape
    dist.all_gather_object(shapes, None if local is None else (tuple(local.shape[1:]), local.dtype))
    row_shape, dtype = next(s for s in shapes if s is not None)
    padded = torch.zeros((-(-num_items // env.world_size), *row_shape), dtype=dtype, device=env.device)
    if local is not None:
        padded[:owned] = local.to(env.device)
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    out = torch.empty((num_items, *row_shape), dtype=dtype)
    for r, part in enumerate(parts):
        out[r :: env.world_size] = part[: len(range(r, num_items, env.world_size))].cpu()
    return out


def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], loader: Loader, env: DistEnv, *,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` over a dataset split across ranks -> (features (N, ...), labels (N,)) in dataset order.

    ``loader`` is an evaluation ``Loader(dataset, cfg, train=False, rank=env.rank,
    world_size=env.world_size, ...)``, which gives each rank the items ``rank_indices``; ``fn``
    is e.g. ``lambda x: model.features(x)["pre_logits"]`` (a sharded model works too). Every
    rank returns all N rows on CPU, each item exactly once (no padding duplicates).
    """
    from tqdm import tqdm  # progress only

    if (loader.rank, loader.world_size, loader.train) != (env.rank, env.world_size, False):
        raise ValueError(f"extract_features needs an evaluation Loader with rank={env.rank}, world_size="
                         f"{env.world_size}; got train={loader.train}, rank={loader.rank}, world_size={loader.world_size}")
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    batches = even_batches(loader.epoch(0), len(loader), env)
    with torch.inference_mode():
        for images, target in tqdm(batches, total=len(loader), desc="features", disable=not (progress and env.is_main)):
            feats.append(fn(images.to(env.device, non_blocking=True)).float().cpu())  # empty batches: 0 rows
            labels.append(target.cpu())
    num_items = len(loader.dataset)
    features = gather_rows(torch.cat(feats) if feats else None, num_items, env)
    return features, gather_rows(torch.cat(labels) if labels else None, num_items, env)
