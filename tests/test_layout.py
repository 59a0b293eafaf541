"""The source tree's shape (DESIGN.md, Layout): no import cycle among the project's own modules, and
dependencies that flow one way (``experiments -> tasks -> (models, losses, data, callbacks) -> distributed``;
models never import Lightning; losses never import models).

Every module of ``mm_lightning/``, ``experiments/`` and ``data/`` is parsed with :mod:`ast` (nothing is
imported or run), and every import statement is collected, those inside functions included, plus
``importlib.import_module("...")`` calls with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("mm_lightning", "experiments", "data")
SKIP_DIRS = {"shards", "__pycache__", "configs", "recipes"}


def _modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` under the roots (``pkg/__init__.py`` is ``pkg``)."""
    found: dict[str, Path] = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if SKIP_DIRS.intersection(parts[:-1]):
                continue
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported_names(name: str, path: Path) -> list[str]:
    """Every dotted name ``path`` imports (absolute; ``from a import b`` gives ``a`` and ``a.b``: the graph keeps
    ``a.b`` when that is a module, ``a`` otherwise)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
    return names


def _graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """The project's import graph (edges to the deepest project module a name points at) and, per
    module, every name it imports (third-party ones included)."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    raw: dict[str, list[str]] = {}
    for name, path in modules.items():
        raw[name] = _imported_names(name, path)
        named = set(raw[name])
        for target in raw[name]:
            if any(other.startswith(target + ".") and other in modules for other in named):
                continue  # `from pkg import submodule`: an edge to the submodule, not to pkg/__init__
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges[name].add(target)
    return edges, raw


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


#: Cycles inside the library, closed by an import inside a function, left for their own change (reported, not
#: yet fixed); the test fails on any other cycle and on a listed one that is gone (so the list only shrinks).
#: * ``ChatTokenizer._check_against_template`` uses ``conversations.encode_segments``, and conversations builds
#:   on ``chat_tokenizer``'s ``ChatTokenizer`` / ``IMAGE_TOKEN``;
#: * ``VisionLanguageModel.from_pretrained`` calls ``vlm_pretrained.load_vlm``, which builds a ``VisionLanguageModel``.
KNOWN_CYCLES: list[list[str]] = [
    ["mm_lightning.data.chat_tokenizer", "mm_lightning.data.conversations"],
    ["mm_lightning.models.vlm", "mm_lightning.models.vlm_pretrained"],
]


def test_no_import_cycle() -> None:
    edges, _ = _graph()
    assert len(edges) > 50  # the walk found the tree
    cycles = _cycles(edges)
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    detail = "\n".join(" <-> ".join(c) + ": " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(edges[a])
                                                          if b in c) for c in new)
    assert not new, f"import cycles among the project's modules:\n{detail}"
    gone = [c for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"no longer a cycle: remove from KNOWN_CYCLES: {gone}"


def test_cycle_finder_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The check itself: a cycle closed by a function-level import is still a cycle."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    assert _imported_names("b", tmp_path / "b.py") == ["a", "a.x"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "mm_lightning" and len(parts) > 1:
        return parts[1]
    return parts[0] if parts[0] in ("experiments", "data") else None


#: (importing layer, imported layer or third-party top-level package) pairs DESIGN.md rules out.
FORBIDDEN = {
    **{(low, "experiments"): "the library never imports the scripts" for low in
       ("tasks", "models", "losses", "data", "callbacks", "distributed", "parallel")},
    **{(low, "tasks"): "dependencies flow experiments -> tasks -> (models, losses, data, callbacks)"
       for low in ("models", "losses", "data", "callbacks", "distributed")},
    ("models", "lightning"): "models never import Lightning",
    ("models", "pytorch_lightning"): "models never import Lightning",
    ("losses", "models"): "losses never import models",
    **{("distributed", low): "distributed is the bottom layer"
       for low in ("tasks", "models", "losses", "data", "callbacks")},
}


def _violations() -> list[str]:
    edges, raw = _graph()
    found = set()
    for module, targets in edges.items():
        if module.startswith("mm_lightning") and any(_layer(t) in ("experiments", "data") and not t.startswith(
                "mm_lightning") for t in targets):
            found.add(f"{module} -> the script folders: the library never imports experiments/ or data/")
        src = _layer(module)
        for target in targets:
            why = FORBIDDEN.get((src, _layer(target))) if target.startswith("mm_lightning") else None
            if why:
                found.add(f"{module} -> {target}: {why}")
        for name in raw[module]:
            why = FORBIDDEN.get((src, name.split(".")[0]))
            if why and not name.startswith("mm_lightning"):
                found.add(f"{module} -> {name.split('.')[0]}: {why}")
    return sorted(found)


#: Known violations of the stated direction, left for their own change (reported, not yet fixed);
#: the test fails on any new one and on a listed one that is gone (so the list only shrinks).
KNOWN_VIOLATIONS: list[str] = []


def test_dependency_direction() -> None:
    found = _violations()
    new = [v for v in found if v not in KNOWN_VIOLATIONS]
    gone = [v for v in KNOWN_VIOLATIONS if v not in found]
    assert not new, "imports against DESIGN.md's dependency direction:\n" + "\n".join(new)
    assert not gone, "fixed: remove from KNOWN_VIOLATIONS:\n" + "\n".join(gone)


if __name__ == "__main__":  # python -m tests.test_layout: print what the tests check
    print("cycles:", *(" <-> ".join(c) for c in _cycles(_graph()[0])) or ["none"], sep="\n  ")
    print("direction:", *_violations() or ["none"], sep="\n  ")
    pytest.main([__file__, "-q", "-n", "0"])
