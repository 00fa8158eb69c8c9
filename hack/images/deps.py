"""Installs kubetune's dependencies (the core ones and those of the extras named on the command
line, from pyproject.toml) at the versions of hack/requirements/constraints.txt (the lock the
test venv is built with), into this Python.

The Dockerfile runs it before it installs the kubetune wheel (without dependencies), so that the
large dependency layer is rebuilt when pyproject.toml or the pins change, not with each code
change:

    python3 deps.py operator        # in the folder that holds pyproject.toml and constraints.txt
"""

import subprocess
import sys
import tomllib
from pathlib import Path

here = Path(__file__).resolve().parent
project = tomllib.loads((here / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
pip = [sys.executable, "-m", "pip", "install", "-q", "-c", str(here / "constraints.txt")]
sys.exit(subprocess.run([*pip, *requirements], check=False).returncode)
