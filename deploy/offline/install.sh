#!/usr/bin/env bash
# Install xraybatch from this folder on a machine with no network: needs only Python 3.11 and the folder.
#   sudo ./install.sh [PREFIX]          (default PREFIX /opt/xraybatch; the venv goes to PREFIX/venv)
# Then: PREFIX/venv/bin/xraybatch run-folder DIR --workdir W, or the systemd units in systemd/ (README.txt).
# The container image is built with this same script (deploy/Dockerfile).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=${1:-/opt/xraybatch}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

if ! "$python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "install.sh: needs Python 3.11 (set PYTHON=/path/to/python3.11); '$python' is not it" >&2
  exit 2
fi
umask 0022  # program files readable by the service user; xraybatch itself runs with umask 0027 for its data
mkdir -p "$prefix"
"$python" -m venv "$prefix/venv"
# Only the wheels in this folder: no index, and no pip configuration of this machine that could name one.
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
pip=("$prefix/venv/bin/python" -m pip install --quiet --no-index --find-links "$here/wheels")
"${pip[@]}" -r "$here/requirements.txt"
"$prefix/venv/bin/xraybatch" --version
"$prefix/venv/bin/xraybatch" models list --verify >/dev/null
echo "installed: $prefix/venv/bin/xraybatch (shipped models verified)"
