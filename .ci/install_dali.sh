#!/usr/bin/env bash
# Installs the `dali` extra into the virtualenv given as $1 (default .venv).
# nvidia-dali-cuda120 is a self-contained wheel (~425 MB: nvJPEG, nvImageCodec and the CUDA runtime pieces it
# needs); on a machine without a GPU it imports and runs its CPU operators (pipeline device_id=None), which is
# what CI exercises. The same wheel uses the GPU (`mixed` decode) wherever a driver is present.
# Idempotent: skips pip when `import nvidia.dali` already works.
set -euo pipefail

VENV="${1:-.venv}"
PY="$VENV/bin/python"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ ! -x "$PY" ]; then
    echo "error: no python at $PY (expected a virtualenv path as the first argument)" >&2
    exit 2
fi

if "$PY" -c "import nvidia.dali" >/dev/null 2>&1; then
    exit 0
fi

# The requirement list is read from setup.cfg so the extra has one source of truth.
mapfile -t REQS < <("$PY" - "$ROOT/setup.cfg" <<'PYEOF'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
for line in cfg["options.extras_require"]["dali"].splitlines():
    if line.strip():
        print(line.strip())
PYEOF
)
echo "install_dali: pip install ${REQS[*]} (a large wheel; a few minutes)"
"$PY" -m pip install -q "${REQS[@]}"
# A smoke run of the CPU operators CI relies on, so a broken wheel fails here rather than as skipped tests.
"$PY" - <<'PYEOF'
import numpy as np
import nvidia.dali as dali
import nvidia.dali.fn as fn
from nvidia.dali import pipeline_def

@pipeline_def(batch_size=1, num_threads=1, device_id=None)
def smoke():
    return fn.gaussian_blur(fn.random.uniform(range=(0.0, 1.0), shape=(8, 8, 3)), sigma=1.0)

pipe = smoke()
pipe.build()
out, = pipe.run()
assert np.asarray(out[0]).shape == (8, 8, 3)
print("install_dali: nvidia-dali", dali.__version__, "(CPU operators work)")
PYEOF
