"""jgoat's imports point downward only (DESIGN.md, "Layers"): read with `ast` from the sources, nothing imported.

* no import cycle among jgoat's modules (module-level imports; ``from jgoat.x import y`` is an edge to the module
  ``jgoat.x.y`` when that is a module, else to ``jgoat.x``; a package's own ``__init__`` is the node ``jgoat.x``);
* no private name (``_name``) imported from another module;
* no jgoat module imported inside a function (a delayed import hides a cycle; only optional heavy third-party
  packages such as torch, matplotlib, PIL, datasets or transformers may be imported lazily);
* adapters import only the core, the hooks and each other; the models' configs, modules and loaders import only the
  core, the hooks, ``jgoat.hub`` (Hub downloads; it imports nothing of jgoat but the errors) and the models
  (``jgoat.models.io`` merges adapters, ``jgoat.models.llama.generation`` runs them through ``jgoat.apply`` and
  ``jgoat.models.auto`` loads onto a mesh with ``jgoat.sharding``'s partition rules, so those three, and the package
  facades re-exporting them, sit above ``jgoat.apply``).

Each check is also run on a small synthetic package, so that a broken walker cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ("jgoat.core", "jgoat.hooks", "jgoat.errors", "jgoat.hub")  # jgoat.hub imports only jgoat.errors
# Above jgoat.apply although inside jgoat.models: they run or merge adapters (see the module docstring).
MODEL_USERS = ("jgoat.models", "jgoat.models.auto", "jgoat.models.io", "jgoat.models.llama",
               "jgoat.models.llama.generation")


def modules(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """{dotted module name: file} of every module of the package at `package_dir` (a package is its __init__)."""
    out = {}
    for f in sorted(package_dir.rglob("*.py")):
        parts = list(f.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]):
    """Import statements run when the module is imported: top level, or inside a top-level if/try (not under
    ``if TYPE_CHECKING:``)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)


def _targets(name: str, node: ast.Import | ast.ImportFrom, mods: dict[str, pathlib.Path]):
    """(module imported, name taken from it or None) for each alias of an import statement in module `name`."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names]
    base = node.module or ""
    if node.level:
        package = name.split(".") if mods[name].name == "__init__.py" else name.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return [(f"{base}.{a.name}", None) if f"{base}.{a.name}" in mods else (base, a.name) for a in node.names]


def _owner(target: str, mods: dict[str, pathlib.Path]) -> str | None:
    """The package module that `target` names or lies in (None: outside the package)."""
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def scan(package_dir: pathlib.Path):
    """(edges {module: {imported module}}, private imports, delayed imports) of the package at `package_dir`."""
    mods = modules(package_dir)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private, delayed = [], []
    for name, file in mods.items():
        tree = ast.parse(file.read_text(), filename=str(file))
        top = {id(n) for n in _module_level(tree.body)}
        typing_only = {id(n) for guard in ast.walk(tree) if isinstance(guard, ast.If) and _is_type_checking(guard)
                       for stmt in guard.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in typing_only:
                continue
            for target, imported in _targets(name, node, mods):
                owner = _owner(target, mods)
                if owner is None or owner == name:
                    continue
                if imported and imported.startswith("_") and not imported.startswith("__"):
                    private.append(f"{name}:{node.lineno} imports {owner}.{imported}")
                if id(node) in top:
                    edges[name].add(owner)
                else:
                    delayed.append(f"{name}:{node.lineno} imports {owner} inside a function")
    return edges, sorted(set(private)), sorted(set(delayed))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1 or v in edges.get(v, ()):
                    found.append(sorted(component))
    return found


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    def allowed(module: str, target: str) -> bool:
        if target in CORE:
            return True
        if module.startswith("jgoat.adapters"):
            return target.startswith("jgoat.adapters")
        if module.startswith("jgoat.models") and module not in MODEL_USERS:
            return target.startswith("jgoat.models")
        return True

    return [f"{m} imports {t}" for m, ts in sorted(edges.items()) for t in sorted(ts) if not allowed(m, t)]


@pytest.fixture(scope="module")
def jgoat_graph():
    return scan(ROOT / "jgoat")


def test_no_import_cycle(jgoat_graph):
    edges, _, _ = jgoat_graph
    assert len(edges) > 30 and edges["jgoat.wrap"] >= {"jgoat.core", "jgoat.adapters", "jgoat.quant"}
    assert cycles(edges) == []


def test_no_private_name_across_modules(jgoat_graph):
    _, private, _ = jgoat_graph
    assert private == []


def test_no_delayed_jgoat_import(jgoat_graph):
    _, _, delayed = jgoat_graph
    assert delayed == []


def test_layers(jgoat_graph):
    edges, _, _ = jgoat_graph
    assert edges["jgoat.adapters.bottleneck"] >= {"jgoat.hooks"} and edges["jgoat.models.llama.modules"] >= {
        "jgoat.hooks"}
    assert layer_violations(edges) == []


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checks_catch_each_violation(tmp_path):
    """A package with a cycle through a package __init__ and a relative import, a private import, a delayed import
    and an import guarded by TYPE_CHECKING (not an edge)."""
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "from . import b\n\ndef f():\n    from pkg.c import g\n    return g\n",
        "pkg/b.py": "import pkg.sub.d\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\ng = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from ..a import _hidden\nfrom .. import c\n",
    })
    edges, private, delayed = scan(pkg)
    assert edges["pkg.b"] == {"pkg.sub.d"} and edges["pkg.c"] == set() and edges["pkg"] == {"pkg.a"}
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub.d"]]
    assert private == ["pkg.sub.d:1 imports pkg.a._hidden"]
    assert delayed == ["pkg.a:4 imports pkg.c inside a function"]
    assert layer_violations({"jgoat.adapters.lora": {"jgoat.wrap"}, "jgoat.models.bert.modules": {"jgoat.adapters"},
                             "jgoat.models.io": {"jgoat.wrap"}}) == [
        "jgoat.adapters.lora imports jgoat.wrap", "jgoat.models.bert.modules imports jgoat.adapters"]
