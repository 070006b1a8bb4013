#!/usr/bin/env bash
# Installs the kit into ./.venv (or $KIT_VENV) with a portable llama-cpp-python.
#   bash build/install.sh          runtime + builder
#   bash build/install.sh --test   the same plus test tools
# Needs only python3 (>= 3.11), pip and a C/C++ compiler. Safe to rerun: a llama-cpp-python
# already built with the same settings is kept.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=llama-cpp.env
source "$ROOT/build/llama-cpp.env"
VENV=${KIT_VENV:-$ROOT/.venv}
BUILD_DIR=${KIT_LLAMA_BUILD_DIR:-$ROOT/build/.llama-build}
EXTRAS=""
[ "${1:-}" = "--test" ] && EXTRAS="[test]"

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "kit needs Python >= 3.11 (found $("$PY" --version)); set PYTHON=python3.11 or newer" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip

stamp_ok() {
  "$VPY" - "$LLAMA_CPP_PYTHON_VERSION" "$LLAMA_CMAKE_ARGS" <<'PYEOF'
import json, pathlib, sys
try:
    import importlib.util
    spec = importlib.util.find_spec("llama_cpp")
    lib = pathlib.Path(spec.origin).parent / "lib"
    stamp = json.loads((lib / "kit-build.json").read_text())
except Exception:
    sys.exit(1)
ok = stamp == {"version": sys.argv[1], "cmake_args": sys.argv[2]} and any(lib.glob("libggml-cpu-*"))
sys.exit(0 if ok else 1)
PYEOF
}

if stamp_ok; then
  echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (portable) already built"
else
  echo "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION portable (every CPU variant; ~12 min on 2 cores)"
  mkdir -p "$BUILD_DIR"
  # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and could hand back a native build.
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
    "$VPY" -m pip install --no-cache-dir --force-reinstall --no-deps --no-binary llama-cpp-python \
      --config-settings="build-dir=$BUILD_DIR" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  # pip installs only the generic ggml-cpu; bring every variant built beside it (docs/ARCHITECTURE.md, trap 1).
  "$VPY" - "$BUILD_DIR" "$LLAMA_CPP_PYTHON_VERSION" "$LLAMA_CMAKE_ARGS" <<'PYEOF'
import importlib.util, json, pathlib, shutil, sys
build, version, args = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
lib = pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib"
variants = sorted(p for p in build.rglob("libggml-cpu-*") if p.is_file() and not p.is_symlink())
if not variants:
    sys.exit(f"no libggml-cpu-* variant libraries under {build}; was GGML_CPU_ALL_VARIANTS set?")
for v in variants:
    shutil.copy2(v, lib / v.name)
(lib / "kit-build.json").write_text(json.dumps({"version": version, "cmake_args": args}))
print(f"copied {len(variants)} CPU variant libraries into {lib}")
PYEOF
fi

"$VPY" -m pip install -q -e "$ROOT$EXTRAS"
echo "kit installed in $VENV"
