"""benchmarks/datasize/study.py end to end on tiny models and synthetic CIFAR: runs, results, resume."""
import contextlib
import io
import json

import pytest

from helpers import load_benchmark, write_cifar

study = load_benchmark("datasize/study")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """The tiny study, run once: its folder, files and printed output."""
    root = tmp_path_factory.mktemp("datasize")
    data = write_cifar(root / "cifar-10-batches-bin")
    files = {"out": root / "runs", "json": root / "results.json", "plot": root / "datasize.png",
             "results": root / "README.md"}
    argv = ["--tiny", "--data", str(data), "--threads", "1", *[a for k, v in files.items() for a in (f"--{k}", str(v))]]
    return {**files, "argv": argv, "printed": run(argv)}


def run(argv: list[str]) -> str:
    """What ``study.main(argv)`` prints (the commands, and the in-process vitlab output)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert study.main(argv) == 0
    return out.getvalue()


def test_the_study_runs_every_model_and_writes_table_png_and_json(done):
    printed = done["printed"]
    assert "$ vitlab train --model vit_mu4_32px --width 32" in printed
    assert "--classes 0 1 2 3 4 --train-subset 20 --epochs 2" in printed
    assert "$ vitlab train --model bit_r26x1_32px --layers 1 1 --stem-width 8 --num-groups 4" in printed
    assert "$ vitlab fewshot --from " in printed and "--classes 5 6 7 8 9 --shots 1,2 --seeds 1" in printed
    assert "$ vitlab finetune --from " in printed and "--classes 5 6 7 8 9 --train-subset 10 --lr 0.01" in printed
    rows = json.loads(done["json"].read_text())["rows"]
    assert sorted((r["family"], r["size"]) for r in rows) == [(f, s) for f in ("BiT", "ViT") for s in (0, 10, 20)]
    for r in rows:
        assert {"pretrain", "fewshot", "finetune"} <= set(r) and set(r["fewshot"]["ridge"]) == {"1", "2"}
        assert 0 <= r["finetune"]["test_top1"] <= 1 and r["fewshot"]["num_test"] == 10  # 2 test images a class
        assert (r["size"] == 0) == ("test_top1" not in r["pretrain"])
    steps = {(r["family"], r["size"]): r["steps"] for r in rows}
    assert steps[("ViT", 10)] == 2 and steps[("ViT", 20)] == 4  # 2 epochs of batch 8: 1 and 2 steps each
    text = done["results"].read_text()
    assert text.count(study.START) == 1 and "| 0 (random init) | BiT | 0 |" in text
    assert "| 20 | ViT | 4 |" in text and "- 1-shot linear, classes 5-9: " in text and "![accuracy" in text
    assert done["plot"].read_bytes()[:4] == b"\x89PNG"


def test_a_second_run_skips_finished_runs_and_continues_stopped_ones(done):
    out = done["out"]
    (out / "ViT-20" / "result_pretrain.json").unlink()  # stopped after its last checkpoint
    (out / "BiT-20" / "result_finetune.json").unlink()  # a stopped fine-tuning
    for name in ("pretrain", "fewshot", "finetune"):  # stopped before its first checkpoint
        (out / "ViT-10" / f"result_{name}.json").unlink()
    (out / "ViT-10" / "pretrain" / "state.pt").unlink()
    before = json.loads(done["json"].read_text())["rows"]
    printed = run(done["argv"])
    assert f"$ vitlab train --resume {out / 'ViT-20' / 'pretrain'} --threads 1" in printed
    assert f"$ vitlab train --resume {out / 'BiT-20' / 'finetune' / 'final'} --threads 1" in printed
    assert f"removing {out / 'ViT-10' / 'pretrain'}: stopped before its first checkpoint" in printed
    assert printed.count("$ vitlab train --model") == 1  # ViT-10 from the start
    # a pre-training that ran again voids what was measured on the folder's earlier model: ViT-20's too
    assert printed.count("$ vitlab fewshot") == 2 and printed.count("$ vitlab finetune") == 2
    assert printed.count("done before:") == 3 * 6 - 3 - 3 - 1  # ViT-10, ViT-20 and a fine-tuning ran
    after = json.loads(done["json"].read_text())["rows"]
    def measured(rows):
        return {(r["family"], r["size"]): (r["pretrain"].get("test_top1"), r["finetune"]["test_top1"]) for r in rows}

    assert measured(after) == measured(before)  # the same numbers again: runs are seeded, resume is exact


def test_dry_run_prints_the_full_study_and_writes_nothing(tmp_path, capsys):
    files = ["--out", str(tmp_path / "runs"), "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png"),
             "--results", str(tmp_path / "R.md")]
    assert study.main(["--dry-run", *files]) == 0
    out = capsys.readouterr().out
    assert out.count("$ vitlab train") == 8 and out.count("$ vitlab fewshot") == 10
    assert out.count("$ vitlab finetune") == 10
    assert "--layers 3 3 2 2 --stem-width 24 --stem-stride 1" in out and "--width 192 --depth 6" in out
    assert "--train-subset 25000 --epochs 15 --batch-size 128" in out and "--train-subset 1000" in out
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        study.main(["--dry-run", "--sizes", "2501", *files])
    assert "--sizes must be positive multiples of 5" in capsys.readouterr().err
