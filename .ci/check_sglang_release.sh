#!/usr/bin/env bash
# Checks GhostServe against one SGLang release, in an environment of its own holding that release
# (created once, then reused): `ghostserve check-sglang` compares the installed SGLang with the
# declarations, then the TP=2 protected smoke test runs on it (tests/test_wheel.py: GhostServe's wheel
# in a fresh environment, a protected server outside the checkout, a fault rebuilt from parity and a
# killed rank replaced, every token unchanged).
# usage: check_sglang_release.sh PYTHON ENV_ROOT VERSION
set -euo pipefail
python=$1
root=$2
version=$3
here=$(cd "$(dirname "$0")/.." && pwd)
env="$root/sglang-$version"
venv="$env/venv"
# Requirements SGLang pins that cannot be installed here: cuda-tile 1.6.0rc5 is a placeholder that
# downloads the real wheel from pypi.nvidia.com (CUDA-only; SGLang does not import it on CPU).
unavailable="cuda-tile"

if [ ! -f "$env/.complete" ]; then
  echo "creating $venv with sglang $version (first time: about ten minutes; log: $env/install.log)"
  rm -rf "$env"
  mkdir -p "$env"
  if ! {
    "$python" -m venv "$venv" \
    && "$venv/bin/pip" install --upgrade pip \
    && "$venv/bin/pip" install --no-deps "sglang==$version" \
    && "$venv/bin/python" - "$unavailable" > "$env/requirements.txt" <<'PY' \
    && "$venv/bin/pip" install -r "$env/requirements.txt"
import importlib.metadata
import re
import sys

skip = set(sys.argv[1].split())
for requirement in importlib.metadata.requires("sglang") or []:
    name = re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0].lower()
    if "extra ==" not in requirement and name not in skip:
        print(requirement)
PY
  } > "$env/install.log" 2>&1; then
    grep -v '^WARNING: Location' "$env/install.log" | tail -40
    echo "set-up failed; the whole log is $env/install.log" >&2
    exit 1
  fi
  touch "$env/.complete"
fi

# GhostServe from this checkout, and its other dependencies at their pinned versions (sglang stays at
# the release under test).
"$venv/bin/python" - "$here/pyproject.toml" > "$env/ghostserve-requirements.txt" <<'PY'
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for requirement in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
    if not requirement.startswith("sglang"):
        print(requirement)
PY
if ! { "$venv/bin/pip" install -r "$env/ghostserve-requirements.txt" \
    && "$venv/bin/pip" install --no-deps -e "$here" \
    && "$venv/bin/python" -m ghostserve_sglang.models; } > "$env/update.log" 2>&1; then
  grep -v '^WARNING: Location' "$env/update.log" | tail -40
  echo "installing GhostServe into $venv failed; the whole log is $env/update.log" >&2
  exit 1
fi

cd "$here"
echo "GhostServe $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)') against sglang $version, $(date -u +%Y-%m-%d)"
echo "\$ ghostserve check-sglang   (sglang $version)"
"$venv/bin/ghostserve" check-sglang 2>&1 | grep -v -i 'warn'
echo "\$ python -m pytest tests/test_wheel.py   (sglang $version)"
"$venv/bin/python" -m pytest tests/test_wheel.py -p no:cacheprovider -v 2>&1 | grep -E 'PASSED|FAILED|ERROR|passed|failed|error'
