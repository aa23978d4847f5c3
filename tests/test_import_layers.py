"""No import circle among the modules of :mod:`tpde_hf.codec` and :mod:`tpde_hf.nn`.

A circle there once ran ``tensor_codec -> compiled -> tensor_codec``; it worked only because one
side imported lazily. Every import statement counts here, at module level, inside functions and
under ``TYPE_CHECKING`` alike, so a lazy import cannot hide a circle. ``from pkg import mod``
counts as an import of ``pkg.mod`` when ``mod`` is a module, else of ``pkg`` (its ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tpde_hf"
LAYERED = ("tpde_hf.codec", "tpde_hf.nn")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``graph[m]``: the tpde_hf modules that ``m`` imports anywhere in its source."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, path.name == "__init__.py", node)
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src for a in node.names]
            graph[mod].update(t for t in targets if t in modules and t != mod)
    return graph


def find_cycle(graph: dict[str, set[str]], within: set[str]) -> list[str] | None:
    """One import circle through the modules of ``within`` only, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m] & within):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(within):
        if m not in state and (found := visit(m)):
            return found
    return None


def _layered(modules: dict[str, Path]) -> set[str]:
    # The packages' own __init__ re-exports their modules; a module importing a sibling through
    # the package (``from tpde_hf.codec import CodecParams``) is fine for Python and left out.
    return {m for m in modules if any(m.startswith(p + ".") for p in LAYERED)}


@pytest.mark.parametrize("package", LAYERED)
def test_no_import_circle(package: str) -> None:
    modules = _modules()
    within = {m for m in _layered(modules) if m.startswith(package + ".")}
    assert within, f"no modules found under {package}"
    cycle = find_cycle(import_graph(modules), within)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_checker_finds_a_circle(tmp_path: Path) -> None:
    """The checker itself: a planted circle, even through a function-level import, is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph, set(graph)) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}, {"a", "b"}) is None
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("from pkg import y\n")
    (pkg / "y.py").write_text("def f():\n    from pkg.x import thing\n")
    mods = {f"pkg.{n}" if n != "__init__" else "pkg": p for n, p in ((p.stem, p) for p in pkg.glob("*.py"))}
    graph = import_graph(mods)
    assert graph["pkg.x"] == {"pkg.y"} and graph["pkg.y"] == {"pkg.x"}
    assert find_cycle(graph, {"pkg.x", "pkg.y"}) in (["pkg.x", "pkg.y", "pkg.x"], ["pkg.y", "pkg.x", "pkg.y"])


def test_codec_layers() -> None:
    """The stored types sit below the codecs: :mod:`encoded` imports no implementation of a delta code."""
    graph = import_graph(_modules())
    for impl in ("tpde_hf.codec.tensor_codec", "tpde_hf.codec.compiled", "tpde_hf.codec.delta_rans",
                 "tpde_hf.codec.delta_class_width", "tpde_hf.codec.rans_reference",
                 "tpde_hf.codec.class_width_compiled"):
        assert impl not in graph["tpde_hf.codec.encoded"], impl
    assert "tpde_hf.codec.tensor_codec" not in graph["tpde_hf.codec.compiled"]
