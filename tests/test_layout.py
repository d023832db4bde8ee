"""The package layout is the architecture (issue 21): a few subpackages, imports one-directional between layers."""
import ast
from pathlib import Path

import yoso

YOSO = Path(yoso.__file__).parent

# Lowest first: a module may import its own layer and the layers before it, never a later one.
LAYERS = [["utils"], ["data"], ["method"], ["outputs", "evaluation"], ["training"], ["testing"]]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def imported_subpackages(path, root):
    """The yoso subpackages a module under ``root`` imports, function-level imports included."""
    package = ".".join(("yoso",) + path.relative_to(root).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the module's own package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"yoso.{a.name}" for a in node.names] if target == "yoso" else [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("yoso.")}
    return found


def layer_violations(root):
    out = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "__init__.py":
            continue
        own = RANK[path.relative_to(root).parts[0].removesuffix(".py")]
        out += [f"{path.relative_to(root)} imports yoso.{sub}"
                for sub in sorted(imported_subpackages(path, root)) if RANK.get(sub, -1) > own]
    return out


def test_top_level_has_few_entries_and_each_is_a_layer():
    entries = sorted(p.name.removesuffix(".py") for p in YOSO.iterdir()
                     if p.name != "__pycache__" and (p.suffix == ".py" or (p / "__init__.py").exists()))
    assert len(entries) <= 8, entries
    assert set(entries) - {"__init__"} == set(RANK), entries


def test_no_module_imports_a_later_layer():
    assert layer_violations(YOSO) == []


def test_the_checker_reports_an_upward_import(tmp_path):
    # negative control: upward imports in all three spellings are reported, downward ones are not
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.py").write_text("def f():\n    from yoso.training.checks import x\n")
    (tmp_path / "data" / "b.py").write_text("from yoso import method\nfrom yoso.utils.atomic import atomic_path\n")
    (tmp_path / "data" / "c.py").write_text("from ..evaluation import runs\nfrom . import a\n")
    assert layer_violations(tmp_path) == ["data/a.py imports yoso.training", "data/b.py imports yoso.method",
                                          "data/c.py imports yoso.evaluation"]


def test_layers_are_documented_in_the_package_docstring():
    for names in LAYERS:
        for name in names:
            assert f"``{name}``" in yoso.__doc__, name
