"""The layers of docs/architecture.md: no seeclip module imports from a layer above its own.

Every import counts, lazy ones inside functions too: a lazy upward import is still a cycle in
the design, only one that fails later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "seeclip"

# module (or package) prefix -> layer; the longest matching prefix wins
LAYERS = {
    # 1. leaves
    "seeclip.config": 1,
    "seeclip.registry": 1,
    "seeclip.paths": 1,
    "seeclip.io": 1,
    "seeclip.distributed": 1,  # torch.distributed helpers (rank, barrier, shards)
    "seeclip.features": 1,
    "seeclip.metrics": 1,
    "seeclip.records": 1,
    "seeclip.figures": 1,  # matplotlib drawings of plain arrays
    "seeclip.generate.feature_config": 1,  # a config section that lives with its generator
    # 2. data and model
    "seeclip.datasets": 2,
    "seeclip.backbone": 2,
    "seeclip.hub": 2,
    "seeclip.zoo": 2,  # the shipped tiny models and their training
    "seeclip.cache": 2,
    # 3. the training loop and the loss terms (knows no method by name)
    "seeclip.trainer": 3,
    "seeclip.losses": 3,
    "seeclip.selection": 3,
    # 4. methods (one module each, the registry, the shared decision rules)
    "seeclip.methods": 4,
    # 5. pseudo-unknowns
    "seeclip.pseudo": 5,
    "seeclip.generate": 5,
    "seeclip.testing": 5,
    # 6. the experiment
    "seeclip.run_config": 6,  # the whole experiment config: sections of every layer below
    "seeclip.runner": 6,
    "seeclip.run_data": 6,
    "seeclip.wiring": 6,
    "seeclip.report": 6,
    "seeclip.validation": 6,
    "seeclip.sweep": 6,
    "seeclip.predict": 6,
    "seeclip.report_files": 6,
    # 7. the app
    "seeclip.cli": 7,
    "seeclip.__main__": 7,  # python -m seeclip / torchrun -m seeclip
}


# the package itself is the public facade: ``seeclip.load`` reaches the experiment layer (lazily);
# no seeclip module imports the bare package
ROOT_LAYER = 7


def layer(module: str) -> int:
    if module == "seeclip":
        return ROOT_LAYER
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(f"{module} has no layer in tests/test_layers.py: add it")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    )
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from seeclip.x import y` may name a submodule y
            out += [f"{mod}.{a.name}" for a in node.names] if mod else []
    return [m for m in out if m == "seeclip" or m.startswith("seeclip.")]


MODULES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_import_from_a_higher_layer(path):
    own = layer(module_name(path))
    upward = [m for m in imports(path) if layer(m) > own]
    assert not upward, f"{module_name(path)} (layer {own}) imports {upward}"


def test_no_registry_is_filled_by_a_side_effect_import():
    """A registry is filled by the module that defines it (or its package's __init__)."""
    for path in MODULES:
        for line in path.read_text().splitlines():
            seeclip_import = "import seeclip" in line or "from seeclip" in line
            assert not (seeclip_import and "noqa: F401" in line), f"{module_name(path)}: {line}"


def _module_of(name: str) -> str | None:
    """The seeclip module (file) an imported name lives in: itself, or its parent."""
    known = {module_name(p) for p in MODULES}
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_no_import_cycles_between_modules():
    """Within a layer too, modules import one way (lazy imports count): a cycle means two
    modules that cannot be read, tested or changed apart."""
    graph = {}
    for path in MODULES:
        me = module_name(path)
        graph[me] = {m for m in map(_module_of, imports(path)) if m and m != me}
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(trail)
                elif nxt not in trail and nxt > start:  # each cycle once, from its least module
                    stack.append((nxt, [*trail, nxt]))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
