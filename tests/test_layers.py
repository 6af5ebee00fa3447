"""The package's folders are its layers: every import points down (DESIGN §3)."""

from __future__ import annotations

import ast
from pathlib import Path

import dpmot_dist

ROOT = Path(dpmot_dist.__file__).parent
BASE = {"errors", "__version__"}  # dpmot_dist.errors and the version: usable everywhere
# What each layer may import besides itself and BASE (function-level imports included).
ALLOWED = {
    "ot": set(),
    "io": set(),
    "config": {"io"},
    "runtime": set(),
    "diffusion": {"ot", "io", "runtime"},
    "pipelines": {"ot", "io", "diffusion", "config", "runtime"},
    "evaluation": {"ot", "io", "diffusion", "config", "runtime"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_layers(path: Path) -> set[str]:
    """The top-level dpmot_dist modules or folders that ``path`` imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "dpmot_dist" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_imports_point_down_the_layers():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        layer = _layer(path)
        if layer not in ALLOWED:
            continue  # faces (cli, demo, bench, benchmarks) may import anything
        for used in _imported_layers(path) - BASE - {layer}:
            if used not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(ROOT)} imports dpmot_dist.{used}")
    assert not wrong, "\n".join(wrong)


def test_subpackages_name_their_public_objects():
    from dpmot_dist import diffusion, evaluation, io, ot, pipelines

    for pkg in (ot, diffusion, io, pipelines, evaluation):
        assert pkg.__doc__ and len(pkg.__doc__) > 200
        assert pkg.__all__ and all(hasattr(pkg, name) for name in pkg.__all__)
    assert {"SDOTSolver", "TargetIndex", "Source"} <= set(ot.__all__)
