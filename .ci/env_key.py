"""Prints the key of the virtual environment: a hash of what it is built from (the Python requirement,
the build system and the dependencies in pyproject.toml). Entry points and package data do not change
the key; set-up re-installs the project itself when pyproject.toml changed."""

import hashlib
import json
import pathlib
import tomllib

project = tomllib.loads((pathlib.Path(__file__).parent.parent / "pyproject.toml").read_text())
inputs = {
    "build-system": project["build-system"],
    "requires-python": project["project"]["requires-python"],
    "dependencies": project["project"]["dependencies"],
    "optional-dependencies": project["project"].get("optional-dependencies", {}),
}
print(hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16])
