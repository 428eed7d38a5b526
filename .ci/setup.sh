#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and the system libraries the project needs.
# usage: setup.sh PYTHON VENV
set -euo pipefail
python=$1
venv=$2
here=$(cd "$(dirname "$0")/.." && pwd)

# Intel ISA-L: the CPU fast path of the codec and the reference the tests compare parity with.
# Prometheus (server and promtool): the metrics tests run every dashboard query against a real one.
missing=()
ldconfig -p 2>/dev/null | grep -q 'libisal\.so\.2' || missing+=(libisal2)
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  echo "installing ${missing[*]} with apt-get"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}" >/dev/null
fi

if [ ! -f "$venv/.complete" ]; then
  log="$venv.install.log"
  echo "creating $venv (first time for these dependencies: installs sglang, about ten minutes; log: $log)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  if ! { "$python" -m venv "$venv" \
      && "$venv/bin/pip" install --upgrade pip \
      && "$venv/bin/pip" install -e "$here[dev]"; } > "$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" | tail -40
    echo "set-up failed; the whole log is $log" >&2
    exit 1
  fi
  echo "$here $(sha256sum "$here/pyproject.toml" | cut -c1-16)" > "$venv/.source"
  touch "$venv/.complete"
fi

# The environment is shared between checkouts: point the editable install at this one, and install the
# project again when its pyproject.toml changed (entry points, package data).
installed="$here $(sha256sum "$here/pyproject.toml" | cut -c1-16)"
if [ "$(cat "$venv/.source" 2>/dev/null)" != "$installed" ]; then
  "$venv/bin/pip" install -q --no-deps -e "$here"
  echo "$installed" > "$venv/.source"
fi

# The bundled models' weights and tokenizers (generated from a seed, checked against SHA256SUMS).
"$venv/bin/python" -m ghostserve_sglang.models >/dev/null
