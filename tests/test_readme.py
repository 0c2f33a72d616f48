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


def bash_commands() -> list[tuple[int, str]]:
    """(line, argv string) of every `vitlab ...` command in the README's ```bash blocks (continuations
    joined, comments and environment prefixes dropped; `torchrun ... -m vitlab` counts)."""
    import re

    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    commands, in_bash, pending, start = [], False, "", 0
    for i, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_bash = line.startswith("```bash")
            continue
        if not in_bash:
            continue
        code = line.split("  #", 1)[0].split(" # ", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if pending:
            code, start = pending + " " + code.strip(), start
        else:
            start = i
        if code.endswith("\\"):
            pending = code[:-1].rstrip()
            continue
        pending = ""
        for part in code.split("&&"):
            match = re.search(r"(?:^|\s)(?:-m )?vitlab (.+)$", part.strip())
            if match and not part.strip().startswith(("python", "make")):
                commands.append((start, match.group(1).strip()))
    return commands


def test_readme_bash_commands_are_found():
    commands = [c for _, c in bash_commands()]
    assert "hub cache" in commands and any(c.startswith("train --recipe cifar10") for c in commands)
    assert any(c.startswith("train --recipe RECIPE --out /shared/runs/r1") for c in commands)  # a continuation
    assert len(commands) > 30


@pytest.mark.parametrize("line, command", bash_commands(), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_readme_bash_commands_parse(line, command):
    """Every verb and option the README shows exists (`[...]` alternatives are read as their first choice)."""
    import re
    import shlex

    from vitlab.cli import parse_args

    command = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(" | ")[0].split("|")[0], command)
    argv = [a for a in shlex.split(command) if a != "..."]
    parse_args(argv)  # an unknown verb or option exits with the parser's error


OFFLINE_SAFE = ("hub list augreg", "hub info vit_b16.augreg_in21k_ft_in1k", "hub cache",
                "hub info vit_s16.augreg_in21k --json")


@pytest.mark.parametrize("command", OFFLINE_SAFE)
def test_readme_offline_bash_commands_run(command, tmp_path, monkeypatch, capsys):
    from vitlab.cli import main

    assert command in [c for _, c in bash_commands()]
    monkeypatch.setenv("VITLAB_HOME", str(tmp_path))
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    assert main(command.split()) == 0
    assert capsys.readouterr().out.strip()
