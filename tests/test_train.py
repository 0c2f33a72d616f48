import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.cli import build_parser, main
from vitlab.data import DataConfig
from vitlab.recipes import RECIPES, recipe
from vitlab.budget import Pacer, step_seconds, steps_for_budget
from vitlab.run import read_metrics
from vitlab.state import Pace
from vitlab.train import every, resume, train
from vitlab.trainconfig import TrainConfig, override, parse_duration
from helpers import TINY, tiny_cfg, write_cifar

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--model", "vit_mu4_32px", "--width", "32", "--depth", "1", "--mlp-dim", "64", "--num-heads", "2"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def quiet(msg: str) -> None:
    pass


# ---------------------------------------------------------------- config and CLI options

def test_override_routes_each_name_to_its_config():
    cfg = override(TrainConfig(), lr=3e-4, depth=2, drop_path=0.1, mixup=0.8, path="/x", seed=3, batch_size=64)
    assert cfg.optim.lr == 3e-4 and cfg.data.mixup == 0.8 and cfg.data.path == "/x"
    assert cfg.model_overrides == {"depth": 2, "drop_path": 0.1} and cfg.seed == 3 and cfg.batch_size == 64
    with pytest.raises(ValueError, match="unknown option 'weight_decy'; did you mean weight_decay"):
        override(cfg, weight_decy=1.0)
    with pytest.raises(ValueError, match="num_classes comes from the data"):
        TrainConfig(model_overrides={"num_classes": 3})
    with pytest.raises(ValueError, match="unknown model"):
        override(cfg, model="vit_b17")
    demo = override(recipe("demo"), steps=50)  # a new run length replaces the recipe's time budget
    assert demo.steps == 50 and demo.time_budget == ""


def test_data_follows_the_model_and_seed():
    cfg = override(TrainConfig(), image_size=48, patch_size=8, mean=(0.4, 0.4, 0.4), seed=5)
    d = cfg.data_config()
    assert (d.image_size, d.mean, d.seed) == (48, (0.4, 0.4, 0.4), 5)


def test_cli_options_are_typed_and_typos_are_errors():
    args = build_parser().parse_args(["train", "--lr", "3e-4", "--image-size", "64", "--mean", "0.1", "0.2", "0.3",
                                      "--no-hflip", "--representation-size", "none", "--pool", "gap",
                                      "--rrc-scale", "0.2", "1"])
    assert (args.lr, args.image_size, args.mean, args.hflip) == (3e-4, 64, (0.1, 0.2, 0.3), False)
    assert args.representation_size is None and args.pool == "gap" and args.rrc_scale == (0.2, 1.0)
    assert not hasattr(args, "depth")  # options not given stay unset
    for bad in (["--lr-rate", "1"], ["--dep", "2"], ["--pool", "max"], ["--lr", "fast"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["train", *bad])
        assert exc.value.code == 2


def test_recipes_are_valid_and_documented():
    assert {"vit_paper_pretrain", "cifar10", "demo"} <= set(RECIPES)
    paper = recipe("vit_paper_pretrain")
    assert paper.optim.lr == 1e-3 and paper.optim.lr_batch_size == 4096 and paper.optim.weight_decay == 0.1
    assert paper.optim.warmup_steps == 10_000 and paper.optim.schedule == "linear"
    assert paper.model_overrides["dropout"] == 0.1 and "Appendix B.1" in RECIPES["vit_paper_pretrain"].source
    assert paper.optim.peak_lr(512) == pytest.approx(1.25e-4)
    with pytest.raises(ValueError, match="did you mean cifar10"):
        recipe("cifar1O")


def test_durations_and_budget_arithmetic():
    assert parse_duration("30m") == 1800 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    assert parse_duration("2.5h") == 9000 and parse_duration("45s") == 45
    for bad in ("soon", "", "0s", "10x"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    # 100 s: 0.5 s steps, an evaluation (10 s) every 40 steps and a checkpoint (1 s) with it.
    steps = steps_for_budget(100, step_s=0.5, eval_s=10, eval_every=40, ckpt_s=1, checkpoint_every=40)
    used = steps * 0.5 + (steps / 40 + 1) * 11
    assert used <= 100 < used + 0.5 + 11 / 40
    assert every(8, 4) and not every(6, 4) and not every(8, 0)


def test_pace_replans_without_breaking_the_schedules():
    pace = Pace(plan=10, total=10)
    assert [pace.position(s) for s in range(10)] == list(range(10))  # no budget: the position is the step
    longer = pace.replan(4, 10)  # a faster machine: 10 steps left after 4 instead of 6
    assert longer.total == 14 and longer.position(4) == pace.position(4) == 4
    positions = [longer.position(s) for s in range(4, 14)]
    assert positions[-1] == 9 and all(a < b for a, b in zip(positions, positions[1:]))  # still ends at plan - 1
    assert pace.replan(4, 0).total == 4  # past the deadline: stop there


def test_pacer_sizes_the_steps_left_from_the_measured_speed():
    sizing = {"step_s_by_size": {16: 0.005, 32: 0.01}, "eval_s": 0.0, "checkpoint_s": 0.0}
    pacer = Pacer(sizing, time.perf_counter() + 1.0, lambda position, plan: 32, every=5, every_s=60.0,
                  eval_every=10**6, checkpoint_every=10**6)
    for _ in range(5):
        pacer.record(32, 0.02)  # steps take twice what the probe said
    left = pacer.replan(Pace(plan=100, total=100), 5).total - 5
    assert 40 <= left <= 50  # ~1 s at 0.02 s a step
    assert pacer.step_s(32) == 0.02 and pacer.step_s(16) == pytest.approx(0.01)  # unseen: the probe's x 2
    assert step_seconds(sizing["step_s_by_size"], 24) == pytest.approx(0.005 + 0.005 * (24**2 - 16**2) / (32**2 - 16**2))


def test_a_run_that_slows_late_replans_by_time_and_its_schedule_finishes(monkeypatch):
    """100 s planned at 0.1 s a step; from step 900 (90 s) each step takes 1 s (10x). Re-planning
    every 1/40 of the steps alone would see it 25 slow steps later, past the deadline."""
    from vitlab import budget

    clock = [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    sizing = {"step_s_by_size": {32: 0.1}, "eval_s": 0.0, "checkpoint_s": 0.0}
    pacer = Pacer(sizing, 100.0, lambda position, plan: 32, every=25, every_s=1.0, eval_every=10**6,
                  checkpoint_every=10**6)
    pace, done, positions = Pace(plan=1000, total=1000), 0, []
    while done < pace.total:
        positions.append(pace.position(done))
        step_s = 0.1 if done < 900 else 1.0
        clock[0] += step_s
        pacer.record(32, step_s)
        done += 1
        if pacer.due(done) and done < pace.total:
            pace = pacer.replan(pace, done)
    assert positions[-1] == 999  # the schedules ended (the lr at its final value), not cut at 54%
    assert all(a <= b for a, b in zip(positions, positions[1:]))
    assert max(b - a for a, b in zip(positions[-6:], positions[-5:])) < 40  # decayed, not dropped at the end
    assert clock[0] <= 100.0 + 3 * 1.0  # on time, within a few slow steps
    assert done < 1000  # the slow part was squeezed


# ---------------------------------------------------------------- the loop

def test_cli_train_eval_predict_end_to_end(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(cifar), *TINY_ARGS, "--drop-path", "0.1", "--steps", "6", "--batch-size", "16",
                 "--mixup", "0.8", "--cutmix", "1.0", "--randaugment-n", "1", "--label-smoothing", "0.1",
                 "--eval-every", "3", "--threads", "1", "--precision", "fp32", "--out", str(run)])
    assert code == 0
    out = capsys.readouterr().out
    assert "test accuracy after 6 steps: top-1" in out and str(run / "curves.png") in out

    config = json.loads((run / "config.json").read_text())
    assert config["model"]["width"] == 32 and config["model"]["drop_path"] == 0.1
    assert config["train"]["steps"] == 6 and config["model"]["num_classes"] == 10
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_top1" in r]
    assert [r["step"] for r in steps] == list(range(1, 7)) and [r["step"] for r in evals] == [3, 6]
    assert all({"loss", "lr", "grad_norm", "images_per_s"} <= set(r) for r in steps)
    assert all(0 <= r["eval_top1"] <= r["eval_top5"] <= 1 for r in evals)
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"

    best = vitlab.load_model(run / "best.safetensors")
    assert best.class_names == [str(i) for i in range(10)]
    assert best.meta["eval_top1"] == max(r["eval_top1"] for r in evals)

    assert main(["eval", str(run), "--json"]) == 0  # the run's data, its best model
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(best.meta["eval_top1"]) and result["num_images"] == 20
    assert len(result["per_class"]) == 10 and Path(result["confusion_png"]).is_file()

    from PIL import Image
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (20 * i, 100, 50)).save(images / f"im{i}.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["predict", str(run), str(images / "im0.png")]) == 0
    line = capsys.readouterr().out.strip()
    probs = [float(x.split()[-1]) for x in line.split(": ", 1)[1].split(", ")]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    csv_path = tmp_path / "pred.csv"
    assert main(["predict", str(run / "last.safetensors"), str(images), "--output", str(csv_path)]) == 0
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("path,label_1,prob_1") and len(rows) == 4  # header + 3 readable images
    assert "broken.jpg" in capsys.readouterr().err  # skipped and reported


def test_resume_after_sigkill_is_bitwise_exact(cifar, tmp_path):
    kw = dict(accum_steps=2, ema_decay=0.9, label_smoothing=0.1, model_overrides={**TINY, "dropout": 0.1})
    straight = train(tiny_cfg(cifar, **kw), tmp_path / "straight", log=quiet)
    assert straight.step == 12

    # The same run in a subprocess that SIGKILLs itself as step 7 begins (checkpoint at step 4).
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        import vitlab.train as t
        from vitlab.data import DataConfig
        real = t.lr_at
        def lr_at(step, **kw):
            if step == 6:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(step, **kw)
        t.lr_at = lr_at
        cfg = t.TrainConfig(model="vit_mu4_32px", model_overrides={kw['model_overrides']!r},
                            data=DataConfig(path={str(cifar)!r}), batch_size=16, steps=12, eval_every=4,
                            checkpoint_every=4, threads=1, precision="fp32", accum_steps=2, ema_decay=0.9,
                            label_smoothing=0.1)
        t.train(cfg, {str(killed)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(killed / "state.pt", weights_only=True)["step"] == 4
    assert max(r["step"] for r in read_metrics(killed / "metrics.jsonl")) == 6  # steps 5, 6 were lost

    resumed = resume(killed, log=quiet)
    assert resumed.step == 12
    a, b = load_file(tmp_path / "straight" / "last.safetensors"), load_file(killed / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)
    state_b = torch.load(killed / "state.pt", weights_only=True)
    assert all(torch.equal(state_a["model"][k], state_b["model"][k]) for k in state_a["model"])
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert losses(killed) == losses(tmp_path / "straight")  # each step once, identical


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_then_exits(cifar, tmp_path, signum):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vitlab", "train", "--data", str(cifar), *TINY_ARGS, "--steps", "100000",
           "--batch-size", "16", "--eval-every", "100000", "--threads", "1", "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and len(read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists()
                                         else []) < 3:
        time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert f"stopped by {signal.Signals(signum).name}" in err and f"--resume {run}" in err
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["step"] >= 3
    assert vitlab.load_model(run / "last.safetensors").meta["step"] == state["step"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(cifar), *TINY_ARGS, "--steps", "10", "--batch-size", "16", "--lr", "1e30",
                 "--checkpoint-every", "1", "--eval-every", "100", "--threads", "1", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 1
    step = int(err.split(" at step ")[1].split(";")[0])
    assert "loss" in err and f"the last good checkpoint (step {step - 1}) is kept" in err
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r)


def test_time_budget_sizes_the_run_then_stops_by_steps(cifar, tmp_path):
    result = train(tiny_cfg(cifar, steps=0, time_budget="2s", eval_every=0, checkpoint_every=0), tmp_path / "r",
                   log=quiet)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["sized_by"]["time_budget"] == "2s" and config["sized_by"]["step_s"] > 0
    assert config["train"]["time_budget"] == "" and result.step >= 1
    pace = torch.load(tmp_path / "r" / "state.pt", weights_only=True)["pace"]
    assert pace["plan"] == config["train"]["steps"] and pace["total"] == result.step  # resume keeps the plan


def test_resume_errors_are_clear(cifar, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(cifar, steps=2), run, log=quiet)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_cfg(cifar, steps=2), run, log=quiet)
    with pytest.raises(ValueError, match=r"\['lr'\] cannot change"):
        resume(run, lr=0.1)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        resume(tmp_path / "nowhere")

    config = json.loads((run / "config.json").read_text())
    config["train"]["model_overrides"]["width"] = 64  # another architecture
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit this model.*another architecture"):
        resume(run, log=quiet)
    (run / "state.pt").write_bytes((run / "state.pt").read_bytes()[:500])  # truncated
    with pytest.raises(ValueError, match="cannot read training state"):
        resume(run, log=quiet)
    assert main(["train", "--resume", str(run)]) == 2  # the CLI: a one-line error


def test_a_run_on_some_classes_is_evaluated_on_them_and_resumes_only_on_them(cifar, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(cifar), *TINY_ARGS, "--classes", "5", "6", "7", "8", "9", "--train-subset",
                 "20", "--steps", "2", "--batch-size", "16", "--eval-every", "2", "--threads", "1", "--precision",
                 "fp32", "--out", str(run)])
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["class_names"] == ["5", "6", "7", "8", "9"] and config["model"]["num_classes"] == 5
    assert config["train"]["data"]["classes"] == [5, 6, 7, 8, 9] and config["train"]["data"]["train_subset"] == 20
    assert config["steps_per_epoch"] == 1  # 20 of the 40 training images of classes 5-9, batch 16
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0  # the run's classes by default
    assert json.loads(capsys.readouterr().out)["num_images"] == 10  # 2 test images of each kept class
    model = str(run / "last.safetensors")
    assert main(["eval", model, "--data", str(cifar)]) == 2  # all 10 classes: the error says what to pass
    assert "trained on 5 of the data's 10 classes: pass --classes 5 6 7 8 9" in capsys.readouterr().err
    assert main(["eval", model, "--data", str(cifar), "--classes", "5", "6", "7", "8", "9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == ["5", "6", "7", "8", "9"]
    with pytest.raises(ValueError, match=r"\['classes', 'train_subset'\] cannot change"):
        resume(run, classes=(0, 1), train_subset=10)


# --- distillation ------------------------------------------------------------------------
def test_a_teacher_labels_the_batches_and_the_student_learns_its_answers(tmp_path):
    data = write_cifar(tmp_path / "cifar-10-batches-bin")
    names = vitlab.data.build_data(DataConfig(path=str(data)), log=lambda m: None).class_names
    teacher = vitlab.create_model("vit_mu4_32px", num_classes=10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **TINY)
    with torch.no_grad():
        teacher.head.bias[3] = 10.0  # answers class 3 for every image, whatever the label
    vitlab.save_model(teacher, tmp_path / "teacher.safetensors", class_names=names)
    cfg = tiny_cfg(data, teacher=str(tmp_path / "teacher.safetensors"), distill_weight=1.0, steps=30,
                   eval_every=30, checkpoint_every=30, optim=vitlab.optim.OptimConfig(lr=3e-3))
    lines = []
    train(cfg, tmp_path / "run", log=lines.append)
    assert any("distilled from" in line for line in lines)
    student = vitlab.load_model(tmp_path / "run" / "last.safetensors").model
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert (student(x).argmax(-1) == 3).all()  # the teacher's answer, not the labels
    with pytest.raises(ValueError, match="train the teacher on the same data"):
        wrong = vitlab.create_model("vit_mu4_32px", num_classes=3, **TINY)
        vitlab.save_model(wrong, tmp_path / "wrong.safetensors", class_names=["a", "b", "c"])
        train(tiny_cfg(data, teacher=str(tmp_path / "wrong.safetensors")), tmp_path / "run2", log=lambda m: None)
    with pytest.raises(ValueError, match="distill_weight must be in"):
        tiny_cfg(data, distill_weight=0.0)


def test_the_teacher_sees_the_students_images_in_its_own_normalisation(tmp_path):
    from vitlab.train import Teacher
    model = vitlab.create_model("vit_mu4_32px", num_classes=2, mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7), **TINY)
    vitlab.save_model(model, tmp_path / "t.safetensors", class_names=["a", "b"])
    teacher = Teacher(str(tmp_path / "t.safetensors"), ["a", "b"], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                      torch.device("cpu"))
    pixels = torch.rand(2, 3, 32, 32)
    student_x = (pixels - 0.5) / 0.25
    expected = (pixels - torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    assert torch.allclose(student_x * teacher.scale + teacher.shift, expected, atol=1e-5)
