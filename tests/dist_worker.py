"""Run under torchrun by tests/test_distributed.py: library-level checks of vitlab.distributed.

Each rank trains a tiny ViT on its share of fixed global batches (DDP with gradient
accumulation, then FSDP2 with activation checkpointing), gathers features and totals, and
rank 0 writes everything to ``OUT/results.pt`` for the test to compare with one process.
"""
from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn.functional as F

from vitlab import create_model
from vitlab.data import ArrayDataset, DataConfig, Loader
from vitlab.distributed import (
    DistEnv, broadcast_object, extract_features, init_distributed, load_model_state, load_optimizer_state,
    model_state, optimizer_state, parallelize, set_gradient_sync, shutdown, sum_across_ranks,
)

GLOBAL_BATCH, STEPS = 8, 3


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vit_mu4_32px", image_size=8, width=16, depth=2, mlp_dim=32, num_heads=2, num_classes=5)


def global_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g))
            for _ in range(steps)]


def train_steps(model, optimizer, batches, env: DistEnv, accum: int) -> None:
    """Each rank takes its contiguous share of every global batch, in ``accum`` micro-batches."""
    for images, labels in batches:
        share = GLOBAL_BATCH // env.world_size
        images, labels = images[env.rank * share:(env.rank + 1) * share], labels[env.rank * share:(env.rank + 1) * share]
        for micro in range(accum):
            set_gradient_sync(model, micro == accum - 1)
            part = slice(micro * share // accum, (micro + 1) * share // accum)
            loss = F.cross_entropy(model(images[part]), labels[part]) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)  # small enough to clip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def make_optimizer(model) -> torch.optim.Optimizer:
    # The key bias gets an exactly-zero gradient (softmax ignores a constant), so with Adam's
    # default eps=1e-8 float rounding alone would become full-size steps; eps=1e-6 keeps the
    # comparison about distribution rather than about noise amplification.
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-6)


def main(out: str) -> None:
    env = init_distributed("cpu", timeout_s=60)
    results = {}
    batches = global_batches(STEPS)

    ddp = parallelize(tiny_model(), env)
    opt = make_optimizer(ddp)
    train_steps(ddp, opt, batches, env, accum=2)
    results["ddp"] = model_state(ddp)
    results["ddp_type"] = type(ddp).__name__
    results["ema_type"] = type(parallelize(tiny_model().requires_grad_(False), env)).__name__  # no DDP

    fsdp = parallelize(tiny_model(), env, shard=True, activation_checkpointing=True)
    opt = make_optimizer(fsdp)
    train_steps(fsdp, opt, batches[:2], env, accum=1)
    # Like state_dict(), these may share storage with the live state: copy before training on.
    results["fsdp_step2_model"] = copy.deepcopy(model_state(fsdp))
    results["fsdp_step2_optim"] = copy.deepcopy(optimizer_state(fsdp, opt))
    results["fsdp_local_numel"] = sum(p.to_local().numel() for p in fsdp.parameters())
    train_steps(fsdp, opt, batches[2:], env, accum=1)
    results["fsdp"] = model_state(fsdp)

    # A fresh sharded model resumes from the full state (as every rank does from a checkpoint).
    again = parallelize(tiny_model(), env, shard=True)
    opt_again = make_optimizer(again)
    load_model_state(again, results_all_ranks(results["fsdp_step2_model"], env))
    load_optimizer_state(again, opt_again, results_all_ranks(results["fsdp_step2_optim"], env))
    train_steps(again, opt_again, batches[2:], env, accum=1)
    results["fsdp_resumed"] = model_state(again)

    # Features in dataset order, each item once (5 items over 2 ranks: 3 + 2, no padding),
    # from the data pipeline's evaluation loader, which gives rank r the items r, r + 2, ...
    data = ArrayDataset(torch.arange(5, dtype=torch.uint8)[:, None, None, None].expand(5, 3, 8, 8).clone(),
                        torch.arange(5) % 3, ["a", "b", "c"])
    identity = DataConfig(image_size=8, mean=(0, 0, 0), std=(1 / 255,) * 3)  # pixels stay 0..255
    for name, subset in (("features", data), ("one_item", data.subset(torch.tensor([4])))):  # rank 1 owns none
        loader = Loader(subset, identity, batch_size=2, train=False, num_classes=3, rank=env.rank,
                        world_size=env.world_size)
        # The sharded model runs in every forward (rank 1 has fewer batches and must keep pace).
        results[name] = extract_features(lambda x: x.mean(dim=(2, 3)) + 0 * fsdp(x).sum(), loader, env)
    results["totals"] = sum_across_ranks([env.rank + 1, 10], env)  # rank r counts r + 1 correct of 10
    if env.is_main:
        torch.save(results, f"{out}/results.pt")
    shutdown()


def results_all_ranks(state, env: DistEnv):
    """Rank 0 holds the full state; give every rank a copy (a checkpoint file does this)."""
    return broadcast_object(copy.deepcopy(state), env)  # loading takes ownership of the tensors


def hang() -> None:
    """Rank 1 stops taking part (alive, silent); rank 0's next collective must time out."""
    env = init_distributed("cpu", timeout_s=3)
    torch.distributed.barrier()
    if env.rank == 1:
        time.sleep(300)
    torch.distributed.all_reduce(torch.ones(1))  # rank 0: raises after about 3 s


if __name__ == "__main__":
    hang() if sys.argv[1] == "hang" else main(sys.argv[1])
