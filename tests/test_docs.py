"""docs/api.md and the docstrings: every example runs and prints what it says, and every public name has both.

Each ```python block of the page is a doctest session, run in a scope of its
own that starts from ``torch``, ``F`` (``torch.nn.functional``) and ``xa`` with
``torch.manual_seed(0)``. A block must compare values (an example with an
expected output), and must leave the rule registry as it found it.

Every public name (``xa.__all__``, ``xa.extend.__all__``, ``xa.queries.__all__``)
has an ``Example:`` section in its docstring, run the same way as a doctest
from ``torch`` and ``xa`` only, under the same rules.
"""

import doctest
import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xa
import xa.extend
import xa.queries

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"
TEXT = API.read_text()
BLOCKS = [(TEXT.count("\n", 0, m.start()) + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", TEXT, re.S)]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("line,block", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_example(line, block):
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block, {"torch": torch, "F": F, "xa": xa}, f"api.md:{line}", str(API), line - 1)
    assert test.examples, "a python block of docs/api.md that is not a doctest session"
    assert any(ex.want.strip() for ex in test.examples), "an example that compares no value"
    before = set(xa.supported())
    torch.manual_seed(0)
    out = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    try:
        runner.run(test, out=out.append, clear_globs=True)
    finally:
        xa.clear_partials()
    assert runner.failures == 0, "".join(out)
    assert set(xa.supported()) == before, "the example left a rule registered"


def _public():
    names = [f"xa.{n}" for n in xa.__all__ if n != "queries"]
    names += [f"xe.{n}" for n in xa.extend.__all__]
    names += [f"xa.queries.{n}" for n in xa.queries.__all__]
    return names


def test_every_public_name_is_documented():
    headings = "\n".join(line for line in TEXT.splitlines() if line.startswith("#"))
    same = {"xe.register": "xa.register", "xe.supported": "xa.supported", "xe.Factor": "xa.Factor",
            "xe.LabelMaker": "xa.LabelMaker"}  # xa.extend re-exports these; documented once
    missing = []
    for name in _public():
        name = same.get(name, name)
        short = name.rsplit(".", 1)[1]
        if name.startswith("xa.queries.") and short[0].isupper():
            if f"xa.queries.{short}" not in TEXT and f"`{short}(" not in TEXT:
                missing.append(name)  # query classes share one section
        elif name.startswith("xa.queries."):
            if f"`xa.{short}`" not in headings:
                missing.append(name)
        elif name.endswith("Error"):
            if f"`{name}`" not in TEXT:
                missing.append(name)  # errors share one table
        elif f"`{name}`" not in headings:
            missing.append(name)
    assert not missing, f"docs/api.md has no section for {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip("# ").lower()).replace(" ", "-")


def test_links_resolve():
    """Every relative link of the README and of docs/ names a file that exists, and an anchor it has."""
    root = API.parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    anchors = {p: {_slug(line) for line in p.read_text().splitlines() if line.startswith("#")} for p in pages}
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and anchor not in anchors.get(dest, set())):
                broken.append(f"{page.name}: {target}")
    assert not broken, broken


def _public_objects():
    """``(name, object)`` of every public name; ``xa.extend`` re-exports some of ``xa``'s (both are listed)."""
    names = [(f"xa.{n}", getattr(xa, n)) for n in xa.__all__ if n != "queries"]
    names += [(f"xe.{n}", getattr(xa.extend, n)) for n in xa.extend.__all__]
    names += [(f"xa.queries.{n}", getattr(xa.queries, n)) for n in xa.queries.__all__]
    return names


PUBLIC = _public_objects()


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_docstring_example(name, obj):
    """The docstring of ``name`` has an ``Example:`` section whose ``>>>`` lines run and compare values."""
    doc = inspect.getdoc(obj) or ""
    assert "Example:" in doc and ">>>" in doc, f"{name}: its docstring has no Example: section with >>> lines"
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs={"torch": torch, "xa": xa})
    examples = [ex for test in tests for ex in test.examples]
    assert examples, f"{name}: doctest found no example in its docstring"
    assert any(ex.want.strip() for ex in examples), f"{name}: an example that compares no value"
    before = set(xa.supported())
    torch.manual_seed(0)
    out = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    try:
        for test in tests:
            runner.run(test, out=out.append, clear_globs=True)
    finally:
        xa.clear_partials()
    assert runner.failures == 0, f"{name}: its docstring example fails\n" + "".join(out)
    assert set(xa.supported()) == before, f"{name}: its example left the rule registry changed"
