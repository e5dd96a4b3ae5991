"""The layers of DESIGN.md, checked on the import graph (read with ``ast``, every import statement counted,
those inside functions too): kernels <- models <- metrics, data, diffusion <- train <- cli / demo. A module
imports only from its own layer or below, and no modules import each other in a circle."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dcae_kernels", "dcae")
# Module-name prefixes and their layer (the longest matching prefix decides). `dcae` itself is the package's
# re-exporting __init__.
LAYERS = {
    "dcae_kernels": 0,
    "dcae.files": 1, "dcae.weights": 1, "dcae.models": 1,
    "dcae": 2, "dcae.data": 2, "dcae.figures": 2, "dcae.fid": 2, "dcae.lpips": 2, "dcae.metrics": 2,
    "dcae.scaling": 2, "dcae.diffusion": 2, "dcae.latents": 2, "dcae.generation_metrics": 2, "dcae.pipeline": 2,
    "dcae.train": 3,
    "dcae.cli": 4, "dcae.demo": 4, "dcae.__main__": 4,
}
NAMES = {0: "kernels", 1: "models", 2: "metrics/data/diffusion", 3: "train", 4: "cli/demo"}


def sources() -> dict[str, str]:
    """Module name -> source of every module of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path.read_text()
    return found


def layer(module: str) -> int:
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    if not matches:
        raise KeyError(f"{module} has no layer: add it to LAYERS in {__file__}")
    return LAYERS[max(matches, key=len)]


def imports(name: str, source: str, modules: set[str]) -> set[str]:
    """The project modules ``name`` imports (relative imports resolved; ``from pkg import sub`` counts the
    submodule when there is one)."""
    package = name if any(m.startswith(name + ".") for m in modules) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def violations(code: dict[str, str]) -> list[str]:
    """Upward imports and import circles in the modules ``code`` (name -> source)."""
    modules = set(code)
    graph = {name: imports(name, source, modules) for name, source in code.items()}
    found = [f"{a} ({NAMES[layer(a)]}) imports {b} ({NAMES[layer(b)]}), a higher layer"
             for a, targets in graph.items() for b in sorted(targets) if layer(b) > layer(a)]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append("import circle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_upward_imports_and_no_circles():
    assert violations(sources()) == []


@pytest.mark.parametrize("module, added, expected", [
    ("dcae.models.blocks", "from ..train import trainer\n", "imports dcae.train.trainer (train), a higher layer"),
    ("dcae_kernels.norm", "import dcae.models\n", "imports dcae.models (models), a higher layer"),
    ("dcae.metrics", "def f():\n    from .cli import main\n", "imports dcae.cli (cli/demo), a higher layer"),
    ("dcae.models.config", "from .autoencoder import DCAE\n", "import circle"),
])
def test_the_check_catches_an_added_import(module, added, expected):
    code = sources()
    code[module] += "\n" + added
    assert any(expected in v for v in violations(code)), violations(code)
