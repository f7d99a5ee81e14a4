#!/bin/bash
# Build, here, the wheels the GPU device machine lacks, for its CPython 3.12 on manylinux x86_64, into .whl/ (ignored
# by git; the device tool carries it with `carry: [".whl"]`): DeepSpeed built without prebuilt ops (its JIT ops
# need the device's nvcc, which the pack does not use), its pydantic, hjson; datasets and its dill, multiprocess;
# zstandard. The versions are the ones this checkout's environment runs (CI tests them). Prints the total size:
# the whole tree a device call carries is limited to 64 MiB.
#   bash tools/gpu/wheels.sh [DEST]        # DEST: .whl (default)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DEST=${1:-$ROOT/.whl}
PY=${DWMTRAIN_PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PY ]] || PY=python3
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf "$DEST"
mkdir -p "$DEST"
# binary wheels for the device's interpreter (pip matches each manylinux tag exactly: the usual ones)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
PKGS=()
for name in pydantic pydantic_core annotated-types typing-inspection hjson datasets dill multiprocess zstandard; do
  PKGS+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" "${PKGS[@]}"
# DeepSpeed is a source distribution: a pure-Python wheel with no op compiled ahead (DS_BUILD_OPS=0)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
ls -1 "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(cd "$ROOT" && git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}' || true)
echo "wheels: $(ls "$DEST"/*.whl | wc -l) files, $((total / 1024 / 1024)) MiB; with the tracked tree $(((total + tree) \
/ 1024 / 1024)) MiB of the 64 MiB a device call carries"
(( total + tree < 64 * 1024 * 1024 )) || { echo "wheels.sh: over the 64 MiB a device call carries" >&2; exit 1; }
