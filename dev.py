"""Set up and run xa from a fresh clone, with nothing but Python.

    python3 dev.py demo    # create .venv, install xa with its test extras, run the demo
    python3 dev.py test    # the same set-up, then the whole test suite
    python3 dev.py readme  # rewrite the list of supported torch nodes in docs/operators.md from the registry

A torch already in the virtual environment is kept; otherwise pip installs
its default build. Set XA_TORCH to pip arguments that name another (for
example ``XA_TORCH="torch==2.13.0"``, or the CPU-only build with
``XA_TORCH="torch --index-url https://download.pytorch.org/whl/cpu"``), and
XA_VENV to keep it in a virtual environment of its own (``.ci/run`` tests the
oldest supported torch that way, beside the newest).
"""

import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / os.environ.get("XA_VENV", ".venv")


OPERATORS = "docs/operators.md"  # holds the generated list between the registry's README_START/README_END markers

READMEGEN = f"""
import re, pathlib, sys, xa.registry as r
p = pathlib.Path({OPERATORS!r})
text = p.read_text()
pattern = re.escape(r.README_START) + ".*?" + re.escape(r.README_END)
new, n = re.subn(pattern, lambda m: r.supported_markdown(), text, flags=re.S)
if n != 1:
    sys.exit(f"{{p}}: expected one generated list between its markers, found {{n}}")
p.write_text(new)
"""


def python() -> Path:
    unix = VENV / "bin" / "python"
    return unix if unix.exists() else VENV / "Scripts" / "python.exe"


def sh(*args) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True)


def setup() -> None:
    if not python().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [python(), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    torch = os.environ.get("XA_TORCH")
    if torch:
        sh(*pip, *shlex.split(torch))
    sh(*pip, "-e", ".[test,lint]")
    peers(pip)


def peers(pip: list) -> None:
    """The peers some tests compare with (BackPACK), where they install beside the torch in use.

    torch is pinned, so a peer that wants another torch (or a torchvision built for another) is
    left out rather than replacing it; its tests then skip, saying so.
    """
    version = subprocess.run([str(python()), "-c", "import torch; print(torch.__version__.split('+')[0])"],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    pin = VENV / "torch-pin.txt"
    pin.write_text(f"torch=={version}\n")
    print("+", " ".join(str(a) for a in (*pip, "-e", ".[peers]", "-c", pin)), flush=True)
    done = subprocess.run([str(a) for a in (*pip, "-e", ".[peers]", "-c", pin)], cwd=ROOT)
    if done.returncode != 0:
        print(f"(the peers of pyproject's [peers] extra do not install beside torch {version}; "
              "the tests that compare with them skip)", flush=True)


def main(argv) -> int:
    command = argv[1] if len(argv) > 1 else "demo"
    if command not in {"demo", "test", "readme"}:
        print(__doc__)
        return 2
    setup()
    if command == "demo":
        sh(python(), "examples/demo.py")
        return 0
    if command == "readme":
        sh(python(), "-c", READMEGEN)
        return 0
    result = subprocess.run([str(python()), "-m", "pytest", *argv[2:]], cwd=ROOT)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv))
