"""The kill matrix (slow: `make test-slow`): a run SIGKILLed at each point where it writes or
computes, then continued as a user would, ends bit for bit where an uninterrupted run ends.

Each case runs the training in a subprocess that kills itself at the n-th call of one function
(``os.replace`` of one file: the file is written but not yet in place; a step; an evaluation).
The user then runs ``--resume`` if the run has a checkpoint, else the same command again.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, tiny_cfg
from vitlab.cli import main
from vitlab.run import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KW = dict(accum_steps=2, ema_decay=0.9, label_smoothing=0.1, model_overrides={**TINY, "dropout": 0.1})

# (case, what is patched, which call kills, a condition on the call's arguments)
CASES = [
    ("config.json written, not in place", "os.replace", 1, "'config.json' in str(args[1])"),
    ("during step 6", "lr_at", 7, "True"),
    ("during the second evaluation", "evaluate", 2, "True"),
    ("best.safetensors written, not in place", "os.replace", 2, "'best.safetensors' in str(args[1])"),
    ("last.safetensors written, not in place", "os.replace", 2, "'last.safetensors' in str(args[1])"),
    ("state.pt written, not in place", "os.replace", 2, "'state.pt' in str(args[1])"),
    ("the final state.pt written, not in place", "os.replace", 3, "'state.pt' in str(args[1])"),
]

SCRIPT = """
import os, signal, sys
import vitlab.checkpoint as checkpoint, vitlab.train as t
from vitlab.data import DataConfig
from vitlab.trainconfig import TrainConfig
target, nth, condition = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls = []
def killing(real):
    def wrapper(*args, **kw):
        if eval(condition):
            calls.append(1)
            if len(calls) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kw)
    return wrapper
if target == "os.replace":
    checkpoint.os.replace = killing(os.replace)
else:
    setattr(t, target, killing(getattr(t, target)))
t.train(TrainConfig(**{cfg!r}, data=DataConfig(path={data!r})), {run!r})
"""


def run_killed(cifar: Path, run: Path, target: str, nth: int, condition: str) -> subprocess.CompletedProcess:
    cfg = {k: v for k, v in vars(tiny_cfg(cifar, **KW)).items() if k not in ("data", "optim")}
    script = textwrap.dedent(SCRIPT.format(cfg=cfg, data=str(cifar), run=str(run)))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", script, target, str(nth), condition], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def straight(cifar, tmp_path_factory):
    from vitlab.train import train

    run = tmp_path_factory.mktemp("straight") / "run"
    assert train(tiny_cfg(cifar, **KW), run, log=lambda m: None).step == 12
    return run


@pytest.mark.parametrize("case, target, nth, condition", CASES, ids=[c[0] for c in CASES])
def test_a_killed_run_continues_bit_for_bit(case, target, nth, condition, cifar, straight, tmp_path, capsys):
    run = tmp_path / "run"
    proc = run_killed(cifar, run, target, nth, condition)
    assert proc.returncode == -9, proc.stderr[-2000:]
    if (run / "state.pt").exists():
        assert main(["train", "--resume", str(run)]) == 0
    else:  # killed before the first checkpoint: the same command again, into the same folder
        from vitlab.train import train
        train(tiny_cfg(cifar, **KW), run, log=lambda m: None)
    assert not list(run.glob(".*.tmp")) and not list(run.glob(".tmp*"))  # a killed write leaves nothing behind
    a, b = load_file(straight / "last.safetensors"), load_file(run / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a, state_b = (torch.load(r / "state.pt", weights_only=True) for r in (straight, run))
    assert state_b["step"] == 12 and all(torch.equal(state_a["model"][k], state_b["model"][k]) for k in state_a["model"])
    losses = lambda r: [(m["step"], m["loss"]) for m in read_metrics(r / "metrics.jsonl") if "loss" in m]
    assert losses(run) == losses(straight)  # each step once, identical
