"""How lstm_core's modules import each other: run folders are read without torch, and the import graph
has no cycle (data flows one way: config -> data -> model -> fit -> run folder)."""
import ast
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGE = REPO / "lstm_core"


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def runs_at_import(tree: ast.AST):
    """Every node of a module except those under `if TYPE_CHECKING:`, which never run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *runs_at_import(child)])
            continue
        yield node
        yield from runs_at_import(node)


def imported(name: str) -> set[str]:
    """The lstm_core modules that `name` imports, at the top or inside a function."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in runs_at_import(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


def test_the_import_graph_of_lstm_core_has_no_cycle():
    graph = {name: imported(name) for name in MODULES}
    done, path = set(), []

    def visit(name: str) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert {"lstm_core.runs", "lstm_core.train"} <= graph["lstm_core.__main__"]   # imports inside functions count


@pytest.mark.parametrize("module", ["lstm_core.runs", "lstm_core.config", "lstm_core.plotfile", "lstm_core.storage",
                                    "lstm_core.dashboard"])
def test_run_folders_and_studies_are_read_without_torch(module):
    """Reading a saves folder or a study's storage (`make dashboard`) must not pay for loading the training stack."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


BLOCKER = """
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: lstm_core must not import it")
sys.meta_path.insert(0, Block())
for module in MODULES:
    importlib.import_module(module)
"""


FIGURES = {"lstm_core.plots", "lstm_core.report"}     # the modules that draw: plotly, and only there


@pytest.mark.parametrize("blocked, modules", [
    (["streamlit", "plotly", "pandas"], sorted(set(MODULES) - FIGURES)),
    (["streamlit", "pandas"], sorted(FIGURES)),
], ids=["engine", "figures"])
def test_the_engine_imports_no_app_packages(blocked, modules):
    """lstm_core is the engine: no Streamlit anywhere in it, and no plotly or pandas outside its figures. The
    view layer (app/) sits between it and the pages."""
    code = f"BLOCKED = {blocked!r}\nMODULES = {modules!r}\n{BLOCKER}"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
