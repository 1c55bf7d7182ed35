"""Print the declared dependency floors of pyproject.toml as exact pins, one `name==X` a line (a pip constraints file).

Every dependency and the `test` extra's must be declared as `name>=X`: CI installs each at exactly X and runs the
fast tests there, so the floors the package declares are the ones tested. torch is left out: the install command
pins it (torch==2.13.0), and pip must never fetch another torch build.
"""
import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch"}

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["test"]  # what CI installs
for requirement in requirements:
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([^\s,;]+)\s*", requirement)
    if match is None:
        sys.exit(f"floors.py: {requirement!r} is not of the form name>=X, so it has no floor to test")
    name, floor = match.groups()
    if name.lower() not in SKIP:
        print(f"{name}=={floor}")
