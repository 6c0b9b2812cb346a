"""The engine's modules import downward only, in the order docs/design.md states.

Every call flows down through the modules and comes back up only to return:
a module may import those before it in the stated order, never one after it
(lazy imports inside functions count too), and the engine imports nothing
from the rules package except, in ``xa/__init__.py``, to register its rules.
"""

import ast
import re
from pathlib import Path

import pytest

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


def _module_of(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name[3:] if name.startswith("xa.") else None


def _calls_between_modules(run) -> set:
    """``(caller module, callee module)`` for every call from one xa module into another while ``run()`` runs."""
    import sys

    pairs = set()

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = _module_of(frame)
        caller = _module_of(frame.f_back) if frame.f_back is not None else None
        if callee and caller and callee != caller:
            pairs.add((caller, callee))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return pairs


def _calls():
    import io

    import torch

    import xa

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    X = torch.randn(16, 2, dtype=torch.float64, requires_grad=True)
    return {
        "backward": lambda: xa.backward(net(X), 2, batch_dim=0),
        "backward in chunks": lambda: xa.backward(net(X).sum(1), 2, max_memory=6e5, create_graph=False),
        "laplacian": lambda: xa.laplacian(net(X), X, batch_dim=0),
        "laplacian in chunks": lambda: xa.laplacian(net(X), X, batch_dim=0, max_memory=3e4),
        "partials backward": lambda: xa.partials(net(X), X, [(0, 1)], batch_dim=0, direction="backward"),
        "mixed": lambda: xa.mixed(net(X).sum(), (X, net[0].weight)),
        "explain": lambda: xa.explain(net(X), query=xa.queries.Laplacian(X), batch_dim=0, file=io.StringIO()),
    }


@pytest.mark.parametrize("name", ["backward", "backward in chunks", "laplacian", "laplacian in chunks",
                                  "partials backward", "mixed", "explain"])
def test_a_call_flows_downward(name):
    """Followed at run time, every call from one engine module into another goes down the stated order."""
    position = {module: n for n, module in enumerate(stated_order())}
    pairs = _calls_between_modules(_calls()[name])
    assert pairs, "nothing was traced"
    upward = sorted(f"xa.{a} calls into xa.{b}" for a, b in pairs
                    if a in position and b in position and position[b] > position[a])
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("name", ["backward", "laplacian", "mixed"])
def test_a_call_builds_one_request_and_plans_once(name):
    from unittest.mock import patch

    import xa.plan
    import xa.request

    calls = _calls()[name]
    calls()  # the plan is cached now; what follows counts the calls of a warm call, and of a cold one
    real_make, real_build = xa.request._make, xa.plan.build
    for clear in (False, True):
        if clear:
            xa.plan._PLANS.clear()
        made, built = [], []

        def make(*a, made=made, **k):
            made.append(1)
            return real_make(*a, **k)

        def build(*a, built=built, **k):
            built.append(1)
            return real_build(*a, **k)

        with patch.object(xa.request, "_make", make), patch.object(xa.plan, "build", build):
            calls()
        assert len(made) == 1 and len(built) == 1, (clear, made, built)


def registered_names(path: Path) -> set:
    """The node names a rules file registers: ``register("Name", ...)``, or in a loop over names around it."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register" and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
        loop = isinstance(node, ast.For) and isinstance(node.iter, (ast.Tuple, ast.List))
        if loop and "register(" in ast.unparse(node):
            for element in node.iter.elts:
                first = element.elts[0] if isinstance(element, ast.Tuple) else element
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names.add(first.value)
    return names


def test_every_overload_of_a_torch_operator_is_in_one_rules_file():
    """``MulBackward0`` and ``MulBackward1`` (mul by a tensor, by a number) are registered in the same file."""
    import xa

    files: dict = {}
    found = set()
    for path in RULES.glob("*.py"):
        for name in registered_names(path):
            found.add(name)
            files.setdefault(re.sub(r"Backward\d+$", "", name), set()).add(path.name)
    assert len(found) > 150 and found <= set(xa.supported())  # the scan sees the registrations
    split = {op: sorted(f) for op, f in files.items() if len(f) > 1}
    assert not split, f"overloads of one operator in several files: {split}"
