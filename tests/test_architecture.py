"""The layout's rules, checked on the source: floors import only downwards, no import circle (imports inside
functions count), files that hold one thing, no reaching into another module's private names, and a
top-level ``kernels/`` folder that shadows nothing when Python runs from the repository root."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 700

# The floors of metamoe, lowest first: a module may import from its own subsystem and from lower floors only.
FLOORS = {
    "version": 0,
    "utils": 1,
    "backends": 1,
    "kernels": 2,
    "ops": 3,
    "data": 3,
    "models": 3,
    "moe": 4,
    "selection": 4,
    "integrations": 5,
    "unify": 5,
    "info": 6,
    "bench": 6,
    "demo": 7,
    "cli": 8,
    "__main__": 9,
    "metamoe": 10,  # the package's __init__
}


def _modules():
    """{module name: path} of metamoe, with the top-level kernels/ folder as metamoe.kernels."""
    mods = {}
    for folder, prefix in ((ROOT / "metamoe", "metamoe"), (ROOT / "kernels", "metamoe.kernels")):
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([prefix, *parts])] = path
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py" or name == "metamoe.kernels"


def _imports(name: str):
    """(imported module, imported names, line) for every import in module ``name``, inside functions too."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("metamoe"):
                    yield a.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if _is_package(name) else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            if base.startswith("metamoe"):
                yield base, tuple(a.name for a in node.names), node.lineno


def _resolve(target: str) -> str:
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _edges():
    edges = {m: set() for m in MODULES}
    for m in MODULES:
        for base, names, _ in _imports(m):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES] or [base]
            for t in targets:
                t = _resolve(t)
                if t != m:
                    edges[m].add(t)
    return edges


def _subsystem(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "metamoe"


def test_floors_import_only_downwards():
    bad = []
    for m, targets in _edges().items():
        src = _subsystem(m)
        for t in targets:
            dst = _subsystem(t)
            if src == dst:
                continue
            assert src in FLOORS and dst in FLOORS, f"{m} or {t}: a subsystem missing from FLOORS"
            if FLOORS[dst] >= FLOORS[src]:
                bad.append(f"{m} imports {t} ({src} is floor {FLOORS[src]}, {dst} floor {FLOORS[dst]})")
    assert not bad, "imports that go sideways or up:\n" + "\n".join(sorted(bad))


def test_no_import_circle():
    edges = _edges()
    # Tarjan's strongly connected components; any component of two or more modules is a circle
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))
    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_circles_and_function_level_imports(tmp_path, monkeypatch):
    """The graph above is built from every import statement, those inside functions included."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from metamoe.b import g\n")
    b.write_text("from metamoe.a import f\n")
    monkeypatch.setitem(MODULES, "metamoe.a", a)
    monkeypatch.setitem(MODULES, "metamoe.b", b)
    edges = _edges()
    assert "metamoe.b" in edges["metamoe.a"] and "metamoe.a" in edges["metamoe.b"]
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circle()


def test_no_private_names_across_modules():
    """``from .x import _name`` reaches into another module's internals: what others use is public."""
    bad = []
    for m in MODULES:
        for base, names, line in _imports(m):
            target = _resolve(base)
            if target == m:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {n} from {target}")
    assert not bad, "\n".join(bad)


def test_files_hold_one_thing():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_kernels_folder_shadows_nothing_from_the_repo_root():
    """Python started in the repository root puts it first on sys.path; its kernels/ folder must not be taken
    for a package called ``kernels`` (transformers imports the PyPI package of that name)."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
            "print(json.dumps(None if s is None else s.origin))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert str(ROOT / "kernels") not in origin, f"`import kernels` from the repo root finds {origin}"


def test_kernels_import_as_metamoe_kernels():
    from metamoe import kernels

    assert [Path(p).resolve() for p in kernels.__path__] == [ROOT / "kernels"]
    from metamoe.kernels import interpreter_compat

    assert Path(interpreter_compat.__file__).resolve() == ROOT / "kernels" / "interpreter_compat.py"
