import subprocess
import sys

from vitlab.cli import main


def test_models_lists_presets_with_numbers(capsys):
    assert main(["models", "vit_b16"]) == 0
    out = capsys.readouterr().out
    assert "vit_b16" in out and "86,567,656" in out and "197" in out and "224x224" in out


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "vitlab", "models", "vit_ti16"], capture_output=True, text=True, check=True)
    assert "5,717,416" in out.stdout
