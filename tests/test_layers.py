"""The house rules: the core never imports the applications, and core subpackages form no cycle.

The import graph is read from the source with ``ast`` (nothing is imported), function-level
imports included; imports under ``if TYPE_CHECKING:`` are exempt (they never run), and so is the
lazy table of ``tucker_fx.__getattr__`` (``tucker_fx.finetune`` loads the training loops on first
use; the last test checks that ``import tucker_fx`` does not).
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

PACKAGE = Path(__file__).resolve().parent.parent / "tucker_fx"

#: rooms of the core: the compression library itself
CORE = {"analysis", "decomposition", "planning", "passes", "kernels", "tuning", "backend", "search", "_internal", "api", "io",
        "config", "errors", "validation", "deploy", "__init__"}
#: rooms that use the core: the paper reproduction and examples, training loops, test nets, old-path facades, CLI
APPLICATIONS = {"apps", "training", "testing", "models", "data", "reporting", "cli", "__main__"}


def _room(module: str) -> str:
    """``tucker_fx.passes.lowering`` -> ``passes``; ``tucker_fx`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _node(module: str) -> str:
    """The unit of the cycle check: a core room, or ``apps.<name>`` for an application of ``apps``."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "apps":
        return "apps." + parts[2]
    return _room(module)


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _exists(module: str) -> bool:
    """Whether ``module`` names a module or package of tucker_fx (not an attribute)."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> Iterator[tuple[str, int, bool]]:
    """``(imported tucker_fx module, line, lazy)`` for every import statement that can run;
    ``lazy``: a module named in a lazy table, imported by ``importlib`` on first use."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tucker_fx":
                    yield alias.name, node.lineno, False
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.module, node.level)
            if target is None or target.split(".")[0] != "tucker_fx":
                continue
            for alias in node.names:  # ``from tucker_fx import training`` imports the subpackage
                sub = f"{target}.{alias.name}"
                yield (sub if _exists(sub) else target), node.lineno, False
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("tucker_fx"):
                yield str(arg.value), node.lineno, False
        elif isinstance(node, ast.Dict):  # lazy tables: {"name": "tucker_fx.room"}
            for value in node.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and \
                        value.value.startswith("tucker_fx.") and _exists(value.value):
                    yield value.value, node.lineno, True


def _resolve(module: str, is_package: bool, name: Optional[str], level: int) -> Optional[str]:
    if level == 0:
        return name
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


@functools.lru_cache(maxsize=None)
def _edges(lazy: bool = True) -> list[tuple[str, str, Path, int]]:
    """``(importer module, imported module, file, line)`` for every import inside the package
    (``lazy=False``: without the lazy tables)."""
    return sorted({(module, target, path, line) for module, path in _modules()
                   for target, line, is_lazy in _imports(module, path) if lazy or not is_lazy})


def test_rooms_are_all_classified():
    rooms = {_room(m) for m, _ in _modules()}
    assert rooms <= CORE | APPLICATIONS, f"unclassified rooms {sorted(rooms - CORE - APPLICATIONS)}: add them above"


def test_core_never_imports_an_application():
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line}: {src} imports {dst}"
           for src, dst, path, line in _edges(lazy=False)
           if _room(src) in CORE and _room(dst) in APPLICATIONS]
    assert not bad, "the core imports an application:\n" + "\n".join(bad)


def _find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> Optional[list[str]]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_cycle_between_rooms():
    """No cycle between core rooms (``__init__`` aside: it re-exports everything, nothing imports it
    for code), nor between applications (``apps.paper``, ``apps.mlp``, ``training``, ...)."""
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for src, dst, path, line in _edges():
        a, b = _node(src), _node(dst)
        if a == b or "__init__" in (a, b):
            continue
        graph.setdefault(a, set()).add(b)
        where.setdefault((a, b), f"{path.relative_to(PACKAGE.parent)}:{line}")
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle between rooms: " + " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} -> {b} at {where[a, b]}" for a, b in zip(cycle, cycle[1:]))


def test_the_graph_sees_function_level_imports():
    edges = {(src, dst) for src, dst, _, _ in _edges()}
    assert ("tucker_fx.backend.dynamo", "tucker_fx.api") in edges  # imported inside a function
    assert ("tucker_fx", "tucker_fx.training") in edges  # the lazy table of tucker_fx.__getattr__


def test_import_tucker_fx_loads_no_application():
    """``import tucker_fx`` loads the core only: no training loops (torch.distributed), no data,
    no models. (``torch`` itself may load ``torch.distributed``; only what we add is checked.)"""
    code = ("import sys, torch; before = set(sys.modules); import tucker_fx; "
            "new = sorted(set(sys.modules) - before); "
            "print([m for m in new if m.startswith('tucker_fx.') and m.split('.')[1] in %r]); "
            "print('torch.distributed.algorithms' in sys.modules and 'torch.distributed.algorithms' not in before)"
            % sorted(APPLICATIONS))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", f"import tucker_fx loaded applications: {out[0]}"
    assert out[1] == "False", "import tucker_fx loaded torch.distributed.algorithms itself"
