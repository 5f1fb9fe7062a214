"""The project's requirements as pip reads them, from pyproject.toml alone: its build system's,
its dependencies, and those of the extras named (``python requirements.py model``).
deploy/Dockerfile installs them before it copies any source, so a change to the code does not
install them again."""

import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    pyproject = tomllib.load(f)
project = pyproject["project"]
extras = [d for name in sys.argv[1:] for d in project["optional-dependencies"][name]]
print("\n".join(pyproject["build-system"]["requires"] + project["dependencies"] + extras))
