"""The layers of docs/ARCHITECTURE.md hold: no import circle (imports inside functions count), the
models import nothing above them, nothing imports the CLI, and `vitlab --help` needs no torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """vitlab module -> the vitlab modules it imports, anywhere in its file (functions included)."""
    files = {module_name(p): p for p in (SRC / "vitlab").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                subs = {f"{module}.{a.name}" for a in node.names} & set(files)
                deps |= subs if subs and not node.module else subs | {module}  # `from . import x`: x only
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "vitlab.models.vit" in graph["vitlab.accel"]
    assert "vitlab.inspect" in graph["vitlab.cli"]  # imported inside cmd_inspect only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_models_import_only_models_and_config():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("vitlab.models"):
            above = {d for d in deps if not d.startswith("vitlab.models") and d != "vitlab.config"}
            assert not above, f"{name} imports {sorted(above)}"


def test_nothing_imports_the_cli():
    graph = import_graph()
    assert [n for n, deps in graph.items() if "vitlab.cli" in deps] == ["vitlab.__main__"]


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--badoption"]])
def test_cli_start_without_torch_for_help(args):
    code = ("import sys; from vitlab.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    expect_torch = args[0] == "train"  # a verb's own options come from the configs (torch)
    assert out.stdout.strip().splitlines()[-1] == str(expect_torch), out.stderr


def test_only_the_cli_imports_serve():
    graph = import_graph()
    users = {n for n, deps in graph.items() if any(d.startswith("vitlab.serve") for d in deps)}
    assert {u for u in users if not u.startswith("vitlab.serve")} == {"vitlab.cli"}
    assert not any("vitlab.cli" in graph[n] for n in graph if n.startswith("vitlab.serve"))


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"]])
def test_help_starts_without_fastapi(args):
    code = ("import sys; from vitlab.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'fastapi' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stderr
