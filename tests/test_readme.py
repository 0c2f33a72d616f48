"""The README's code and tables are what the code does: its Python blocks run, its generated tables are current."""
from __future__ import annotations

from pathlib import Path

import pytest

import vitlab


def readme_section(title: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_table_is_the_catalog(monkeypatch):
    monkeypatch.delenv("VITLAB_CATALOG", raising=False)
    from vitlab.cli import catalog_table

    section = readme_section("Pretrained models")
    table = section.split("tests/test_readme.py checks it) -->\n", 1)[1].split("\n<!-- end catalog table -->", 1)[0]
    names = vitlab.list_pretrained()
    assert table == catalog_table([vitlab.hub.entry_for(n) for n in names]), \
        "regenerate the README table with `vitlab hub list --markdown`"
    assert len(names) > 60 and "vit_conv_32px.vitlab_cifar10" in names


def test_readme_python_example_runs_offline(monkeypatch, capsys):
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    block = readme_section("Pretrained models").split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "README.md", "exec"), {})
    label, prob = capsys.readouterr().out.rsplit(" ", 1)
    assert label in vitlab.hub.labels("cifar10") and 0.1 <= float(prob) <= 1.0


def python_blocks() -> list[tuple[int, str]]:
    """(line, code) of every ```python block of the README."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    blocks, start = [], None
    for i, line in enumerate(lines, 1):
        if line.startswith("```python"):
            start = i
        elif line.startswith("```") and start is not None:
            blocks.append((start, "\n".join(lines[start:i - 1])))
            start = None
    return blocks


# Blocks that need the CIFAR-10 data and minutes to hours of training (the recipes run in
# tests/test_train.py and tests/test_transfer.py at a tiny size instead).
NEEDS_TRAINING = ("build_data(cfg)", "recipe(\"cifar10\")", "fewshot_checkpoint(")


@pytest.mark.parametrize("line, code", [b for b in python_blocks() if not any(k in b[1] for k in NEEDS_TRAINING)],
                         ids=lambda v: str(v) if isinstance(v, int) else "")
def test_readme_python_blocks_run(line, code, monkeypatch):
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    exec(compile(code, f"README.md:{line}", "exec"), {})
