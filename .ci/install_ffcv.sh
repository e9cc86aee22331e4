#!/usr/bin/env bash
# Installs the `ffcv` extra into the virtualenv given as $1 (default .venv), on a fresh Debian machine.
# ffcv 1.0.2 ships only an sdist: its C extension is compiled at install time against OpenCV and libjpeg-turbo
# found through pkg-config, and it imports PIL without declaring it (the extra in setup.cfg adds pillow).
# Idempotent: skips apt when the packages are present and pip when `import ffcv` already works.
set -euo pipefail

VENV="${1:-.venv}"
PY="$VENV/bin/python"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APT_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev g++)  # g++: ffcv's extension, torch.compile on CPU

if [ ! -x "$PY" ]; then
    echo "error: no python at $PY (expected a virtualenv path as the first argument)" >&2
    exit 2
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "install_ffcv: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if "$PY" -c "import ffcv, ffcv.libffcv" >/dev/null 2>&1; then
    exit 0
fi

# The requirement list is read from setup.cfg so the extra has one source of truth; fastssl itself is not
# installed here (the Makefile owns that).
mapfile -t REQS < <("$PY" - "$ROOT/setup.cfg" <<'PYEOF'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
for line in cfg["options.extras_require"]["ffcv"].splitlines():
    if line.strip():
        print(line.strip())
PYEOF
)
echo "install_ffcv: pip install ${REQS[*]} (compiles ffcv; a few minutes)"
"$PY" -m pip install -q "${REQS[@]}"
"$PY" -c "import ffcv, ffcv.libffcv, numba; print('install_ffcv: ffcv', ffcv.__version__, 'numba', numba.__version__)"
