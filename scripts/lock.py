"""Refresh ``constraints.txt``, the exact versions the suite passes with.

    python scripts/lock.py   # a few minutes: the package with its test and gpu-compile extras
                             # in a new virtual environment in a temporary folder, then pip freeze

It writes every installed distribution as ``name==version`` (the package itself left out). Run
``.ci/run`` (it installs with the new file) before committing it; ``tests/test_lock.py`` checks
that every pin lies within ``pyproject.toml``'s ranges, so widen a range there first when a new
release line is wanted.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADER = """\
# The exact versions the test suite passed with (Python 3.11, Linux x86_64).
# Used by the README's install commands and by .ci/run: pip install -c constraints.txt ...
# Refresh: python scripts/lock.py (then run .ci/run before committing the new file).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "constraints.txt"), help="the lock file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        venv = pathlib.Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        subprocess.run([*pip, "install", "-q", f"{ROOT}[test,gpu-compile]"], check=True)
        frozen = subprocess.run(
            [*pip, "freeze", "--exclude", "fwi-jax"], check=True, capture_output=True, text=True
        ).stdout
    pins = sorted((ln for ln in frozen.splitlines() if "==" in ln), key=str.lower)
    pathlib.Path(args.out).write_text(HEADER + "".join(p + "\n" for p in pins))
    print(f"{args.out}: {len(pins)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
