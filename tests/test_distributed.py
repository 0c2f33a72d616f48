"""Distributed training on CPU with gloo: 2 processes under torchrun against 1 process."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_worker as W
from helpers import write_cifar
from vitlab.cli import main
from vitlab.data import ArrayDataset, DataConfig, Loader
from vitlab.run import read_metrics
from vitlab.train import resume
from vitlab.distributed import DistEnv, gather_rows, load_model_state, load_optimizer_state, model_state, \
    parallelize, rank_indices, read_env, sum_across_ranks

SRC = str(Path(__file__).resolve().parents[1] / "src")


def torchrun(args: list[str], *, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N ARGS`` on this machine (a free port on localhost)."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=0.5", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run tests/dist_worker.py on 2 ranks once; its results and one-process references."""
    out = tmp_path_factory.mktemp("dist")
    proc = torchrun([str(Path(__file__).with_name("dist_worker.py")), str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "results.pt", weights_only=True)


def single_process(steps: int, accum: int = 1):
    """The same training in one process with the whole global batch per step."""
    model = W.tiny_model()
    opt = W.make_optimizer(model)
    W.train_steps(model, opt, W.global_batches(steps), DistEnv(), accum=accum)
    return model, opt


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_ddp_with_accumulation_equals_one_process(two_ranks):
    assert two_ranks["ddp_type"] == "DistributedDataParallel"
    assert two_ranks["ema_type"] == "VisionTransformer"
    reference, _ = single_process(W.STEPS)
    start = W.tiny_model().state_dict()
    assert max_diff(reference.state_dict(), start) > 1e-3  # training moved the weights
    assert max_diff(two_ranks["ddp"], reference.state_dict()) <= 1e-5


def test_fsdp2_sharded_with_checkpointing_equals_one_process(two_ranks):
    reference, _ = single_process(W.STEPS)
    numel = sum(p.numel() for p in reference.parameters())
    assert two_ranks["fsdp_local_numel"] < 0.6 * numel  # each rank holds about half
    assert max_diff(two_ranks["fsdp"], reference.state_dict()) <= 1e-5
    assert max_diff(two_ranks["fsdp_resumed"], reference.state_dict()) <= 1e-5


def test_resume_sharded_two_rank_state_in_one_process(two_ranks):
    model, opt = W.tiny_model(), None
    opt = W.make_optimizer(model)
    load_model_state(model, two_ranks["fsdp_step2_model"])
    load_optimizer_state(model, opt, two_ranks["fsdp_step2_optim"])
    W.train_steps(model, opt, W.global_batches(W.STEPS)[2:], DistEnv(), accum=1)
    reference, _ = single_process(W.STEPS)
    assert max_diff(model.state_dict(), reference.state_dict()) <= 1e-5


def test_features_in_order_once_and_exact_totals(two_ranks):
    features, labels = two_ranks["features"]
    assert features.tolist() == [[float(i)] * 3 for i in range(5)]
    assert labels.tolist() == [i % 3 for i in range(5)]
    features, labels = two_ranks["one_item"]
    assert features.tolist() == [[4.0] * 3] and labels.tolist() == [1]
    assert two_ranks["totals"].tolist() == [1 + 2, 20]


# ---------------------------------------------------------------- `vitlab train` under torchrun

TRAIN_ARGS = ["--model", "vit_mu4_32px", "--width", "32", "--depth", "1", "--mlp-dim", "64", "--num-heads", "2",
              "--batch-size", "16", "--accum-steps", "2", "--steps", "12", "--eval-every", "4",
              "--eval-batch-size", "5", "--precision", "fp32", "--threads", "1", "--crop", "none", "--no-hflip",
              "--no-qkv-bias"]  # the key bias has a zero gradient: Adam would turn rounding into steps

# Rank 1 is SIGKILLed as step 7 begins (the checkpoint of step 4 is on disk); the rest is `vitlab train`.
KILLED_RUN = """
import os, signal, sys
import vitlab.train as t
real = t.lr_at
def lr_at(step, **kw):
    if step == 6 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(step, **kw)
t.lr_at = lr_at
from vitlab.cli import main
from vitlab.data import ArrayDataset, DataConfig, Loader
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_train_killed_rank_then_resume_in_one_process(tmp_path):
    data = write_cifar(tmp_path / "cifar-10-batches-bin", n_test=21)  # evaluation shares of 11 and 10
    args = ["train", "--data", str(data), *TRAIN_ARGS]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0  # the reference: one process

    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    start = time.monotonic()
    proc = torchrun([str(script), *args, "--shard", "--activation-checkpointing", "--out", str(tmp_path / "two")])
    assert proc.returncode != 0 and time.monotonic() - start < 100, proc.stderr[-3000:]
    assert "global batch = 4 per process x 2 processes x 2 accumulation steps" in proc.stdout
    assert proc.stdout.count("vit_mu4_32px: ") == 1 and proc.stdout.count("data: cifar10") == 1  # rank 0 alone

    one, two = tmp_path / "one", tmp_path / "two"
    state = torch.load(two / "state.pt", weights_only=True)  # the last checkpoint is intact
    assert state["step"] == 4
    records = lambda run, key: {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}
    losses, evals = records(two, "loss"), records(two, "eval_loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6][: len(losses)] and len(losses) >= 4 and 4 in evals
    for step in (1, 2, 3, 4):  # the same global batches: the global batch's loss as in one process
        assert abs(losses[step] - records(one, "loss")[step]) <= 1e-5
    # Evaluation over uneven shares (11 and 10 images) of a sharded model: the exact totals.
    assert abs(evals[4] - records(one, "eval_loss")[4]) <= 1e-5
    assert records(two, "eval_top1")[4] == records(one, "eval_top1")[4]

    resumed = resume(two, log=lambda message: None)  # a 2-process sharded run, continued in 1 process
    assert resumed.step == 12
    a, b = load_file(one / "last.safetensors"), load_file(two / "last.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert read_metrics(two / "metrics.jsonl")[-1]["eval_top1"] == read_metrics(one / "metrics.jsonl")[-1]["eval_top1"]


def test_hung_rank_ends_the_job_with_an_error_within_the_timeout():
    start = time.monotonic()
    proc = torchrun([str(Path(__file__).with_name("dist_worker.py")), "hang"])
    assert proc.returncode != 0
    assert time.monotonic() - start < 90  # timeout 3 s + start-up on a loaded machine; never 300 s
    assert "timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower(), proc.stderr[-2000:]


def test_ranks_share_each_global_batch_without_overlap():
    """Global step s holds the same images for any world size (what resume with another world size needs)."""
    data = ArrayDataset(torch.zeros(50, 3, 8, 8, dtype=torch.uint8), torch.arange(50) % 5, list("abcde"))
    cfg = DataConfig(image_size=8, crop="none", hflip=False)
    global_batch, accum = 8, 2

    def steps(world_size: int) -> list[set[int]]:
        micro = global_batch // (world_size * accum)
        per_rank = [Loader(data, cfg, batch_size=micro, train=True, num_classes=5, rank=r, world_size=world_size)
                    .indices(epoch=3).tolist() for r in range(world_size)]
        seen = [i for share in per_rank for i in share]
        assert len(seen) == len(set(seen))  # no image twice in the epoch, across ranks
        n_steps = len(per_rank[0]) // (micro * accum)
        return [{i for share in per_rank for i in share[s * micro * accum:(s + 1) * micro * accum]}
                for s in range(n_steps)]

    assert steps(2) == steps(1) == steps(4)[: len(steps(2))] and len(steps(2)) == 50 // global_batch


def test_single_process_helpers():
    env = DistEnv()
    assert read_env({}) == (0, 0, 1)
    assert read_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == (1, 1, 2)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        read_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK=2"):
        read_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert list(rank_indices(5, DistEnv(rank=1, world_size=2))) == [1, 3]
    assert gather_rows(torch.arange(4.0)[:, None], 4, env).flatten().tolist() == [0, 1, 2, 3]
    assert sum_across_ranks([2, 3], env).tolist() == [2.0, 3.0]
    model = parallelize(W.tiny_model(), env, activation_checkpointing=True)
    assert set(model_state(model)) == set(W.tiny_model().state_dict())  # wrapper prefix hidden
    # A ResNet's residual units (``stages`` of Sequentials) are checkpointed like ViT blocks.
    torch.manual_seed(0)
    resnet = torch.nn.Module()
    resnet.stages = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()) for _ in range(2))
    keys, x = set(resnet.state_dict()), torch.randn(3, 4)
    expected = resnet.stages[1](resnet.stages[0](x))
    parallelize(resnet, env, activation_checkpointing=True)
    assert set(resnet.state_dict()) == keys and "CheckpointWrapper" in repr(resnet.stages[0][0])
    assert torch.equal(resnet.stages[1](resnet.stages[0](x)), expected)
    with pytest.raises(ValueError, match="no `blocks`"):
        parallelize(torch.nn.Linear(2, 2), env, activation_checkpointing=True)
    state = W.tiny_model().state_dict()
    state["head.weight"] = state["head.weight"][:3]
    with pytest.raises(ValueError, match=r"head.weight has shape \(3, 16\)"):
        load_model_state(model, state)
    with pytest.raises(ValueError, match="missing keys"):
        load_model_state(model, {})
