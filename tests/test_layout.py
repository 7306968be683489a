"""The package's boundaries: no import cycle among its modules, no private names across them."""

import ast
import pathlib

import vi_toolkit

PACKAGE = pathlib.Path(vi_toolkit.__file__).parent
ROOT = PACKAGE.parent


def _modules():
    """``{dotted name: path}`` of every module of vi_toolkit, models and guides included."""
    found = {f"vi_toolkit.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    for sub in ("models", "guides"):
        found.update({f"vi_toolkit.{sub}.{p.stem}": p for p in (ROOT / sub).glob("*.py") if p.stem != "__init__"})
    return found


def _imports(name, path):
    """(module imported, names taken from it) for every toolkit import in ``path``, at any depth."""
    package = name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("vi_toolkit"):
                yield target, [alias.name for alias in node.names]


def test_no_module_imports_another_modules_private_names():
    offences = [f"{name} imports {target}.{n}" for name, path in _modules().items()
                for target, names in _imports(name, path) for n in names
                if n.startswith("_") and not n.startswith("__")]
    assert offences == []


def test_the_modules_import_each_other_without_a_cycle():
    modules = _modules()
    graph = {name: {t if t in modules else f"{t}" for t, names in _imports(name, path)}
             for name, path in modules.items()}
    for name in modules:  # `from vi_toolkit.models import gmm` names the module gmm
        graph[name] |= {f"{t}.{n}" for t, names in _imports(name, modules[name]) for n in names
                        if f"{t}.{n}" in modules}
        graph[name] = {t for t in graph[name] if t in modules and t != name}

    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_check_finds_a_planted_cycle(tmp_path, monkeypatch):
    """Negative control: two modules that import each other are reported."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from .b import thing\n")
    b.write_text("from .a import other\n")
    found = {"vi_toolkit.a": a, "vi_toolkit.b": b}
    monkeypatch.setattr(__import__(__name__), "_modules", lambda: found)
    try:
        test_the_modules_import_each_other_without_a_cycle()
    except AssertionError as err:
        assert "vi_toolkit.a" in str(err) and "vi_toolkit.b" in str(err)
    else:
        raise AssertionError("the planted cycle was not found")
