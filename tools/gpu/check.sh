#!/bin/bash
# The GPU pack (tools/gpu/check.py): on the device machine, install the wheels tools/gpu/wheels.sh built into .whl/
# (DeepSpeed, datasets, ...: what its image lacks) into /tmp/site, then run every part within 8 minutes, writing
# under $OUT. With --cpu: the same parts at tiny sizes with this checkout's own environment (CI runs it).
#   bash tools/gpu/check.sh [--cpu] [check.py options: --only loss,train ...]
# Through the device tool, in one call: carry [".whl"], timeout_s 540, command `bash tools/gpu/check.sh`; $OUT comes
# back with summary.txt, summary.json and one log per part.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${DWMTRAIN_PYTHON:-python3}
if [[ ${1:-} == --cpu ]]; then
  [[ -x $ROOT/.venv/bin/python && -z ${DWMTRAIN_PYTHON:-} ]] && PY=$ROOT/.venv/bin/python
else
  if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
    echo "# installing $(ls "$ROOT"/.whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$ROOT"/.whl/*.whl || { echo "check.sh: the wheels did not install" >&2; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
  else
    echo "# no .whl/ here (tools/gpu/wheels.sh builds it): using what $PY has"
  fi
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" "$ROOT/tools/gpu/check.py" "$@"
