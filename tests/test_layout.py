"""The engine's modules import downward only, in the order docs/design.md states.

Every call flows down through the modules and comes back up only to return:
a module may import those before it in the stated order, never one after it
(lazy imports inside functions count too), and the engine imports nothing
from the rules package except, in ``xa/__init__.py``, to register its rules.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "xa"
RULES = ROOT / "xa_ops"


def stated_order() -> list:
    """The modules in the order of docs/design.md's "Import order" line: ``a → b → c``."""
    text = (ROOT / "docs" / "design.md").read_text()
    found = re.search(r"## Import order\n(.*?)\n## ", text, flags=re.S)
    assert found, "docs/design.md has no '## Import order' section"
    line = next(ln for ln in found.group(1).splitlines() if "→" in ln)
    return [name.strip(" `") for name in line.split("→")]


def imports(path: Path, package: str) -> set:
    """The modules of ``package`` that the file at ``path`` imports (anywhere in it)."""
    tree = ast.parse(path.read_text())
    own = path.parent.name == package
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and own:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == package:
                rest = node.module.split(".")[1:]
                if rest:
                    found.add(rest[0])
                else:
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_the_stated_order_names_every_engine_module_once():
    order = stated_order()
    modules = sorted(p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__")
    assert sorted(order) == modules, "docs/design.md's import order and the files of xa/ differ"
    assert len(set(order)) == len(order)


def test_every_engine_module_imports_only_those_before_it():
    order = stated_order()
    position = {name: n for n, name in enumerate(order)}
    upward = []
    for name in order:
        for dep in imports(ENGINE / f"{name}.py", "xa"):
            if dep in position and position[dep] >= position[name]:
                upward.append(f"xa/{name}.py imports xa.{dep}, which comes after it")
    assert not upward, "\n".join(upward)


def test_the_engine_imports_no_rules():
    for path in ENGINE.glob("*.py"):
        if path.stem == "__init__":
            continue
        assert not any("xa_ops" in line for line in path.read_text().splitlines()
                       if line.lstrip().startswith(("import ", "from "))), f"{path.name} imports xa_ops"


def test_rules_import_only_what_rules_are_written_with():
    """A rules file reads the rule-writing surface of the engine, never its planner or executor."""
    allowed = {"errors", "factor", "families", "registry", "fallback"}
    for path in RULES.glob("*.py"):
        used = imports(path, "xa")
        assert used <= allowed, f"xa_ops/{path.name} imports xa.{sorted(used - allowed)}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check is not vacuous: a module importing one after it is caught."""
    pkg = tmp_path / "xa"
    pkg.mkdir()
    (pkg / "plan.py").write_text("from .api import backward\n")
    assert imports(pkg / "plan.py", "xa") == {"api"}
    (pkg / "plan.py").write_text("def f():\n    from . import attach\n    import xa.explain\n")
    assert imports(pkg / "plan.py", "xa") == {"attach", "explain"}
