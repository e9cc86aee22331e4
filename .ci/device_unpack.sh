#!/usr/bin/env bash
# On the GPU machine: joins the parts that .ci/device_bundle.sh made (carried there as .carry/p1 .. pK, one per
# call), checks them, and installs their contents into python3's site-packages; the shared libraries ffcv
# needs go to $BUNDLE_LIB. Source it (`. .ci/device_unpack.sh`) so LD_LIBRARY_PATH reaches later commands, or
# run it with bash and export LD_LIBRARY_PATH="$BUNDLE_LIB" yourself. Idempotent: a second call only exports.
PY=${PY:-python3}
BUNDLE_LIB=${BUNDLE_LIB:-/opt/fastssl-bundle/lib}
_unxz() {  # xz where installed, else python's lzma
    if command -v xz >/dev/null; then xz -dc; else
        "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)'
    fi
}
_unpack() {
    local n k sp
    if [ -f "$BUNDLE_LIB/.done" ]; then return 0; fi
    if [ ! -f .carry/p1/parts ]; then
        echo "device_unpack: no .carry/p1 here; carry the parts of bash .ci/device_bundle.sh first" >&2
        return 2
    fi
    n=$(cat .carry/p1/parts)
    for ((k = 1; k <= n; k++)); do
        if [ ! -f ".carry/p$k/bundle.part" ]; then
            echo "device_unpack: part $k of $n is missing (.carry/p$k); carry it in a call of its own" >&2
            return 2
        fi
        (cd ".carry/p$k" && sha256sum --quiet -c bundle.sha256) || {
            echo "device_unpack: part $k of $n does not match its checksum; carry it again" >&2
            return 2
        }
    done
    sp=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 2
    [ -n "$sp" ] && [ -d "$sp" ] || { echo "device_unpack: no site-packages folder from $PY ($sp)" >&2; return 2; }
    mkdir -p "$BUNDLE_LIB" || return 2
    local stage
    stage=$(mktemp -d)
    for ((k = 1; k <= n; k++)); do cat ".carry/p$k/bundle.part"; done | _unxz | tar -C "$stage" -xf - || {
        echo "device_unpack: the joined parts do not unpack" >&2
        return 2
    }
    cp -a "$stage/site/." "$sp/" && cp -a "$stage/lib/." "$BUNDLE_LIB/" && rm -rf "$stage" || return 2
    touch "$BUNDLE_LIB/.done"
    echo "device_unpack: installed into $sp ($n parts)"
}
_unpack
_rc=$?
# ffcv's libraries, and nvJPEG (cu12) for nvImageCodec should it look for it on the loader's path.
_sp=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export LD_LIBRARY_PATH="$BUNDLE_LIB:$_sp/nvidia/nvjpeg/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "$_rc" -eq 0 ]; then
    "$PY" -c "import nvidia.dali as d, ffcv, ffcv.libffcv; print('device_unpack: dali', d.__version__, 'ffcv', ffcv.__version__)" 2>&1 \
        | grep -v -e nvjpeg2k -e nvtiff -e nvJPEG2000 -e nvTIFF  # nvImageCodec's notes on codecs fastssl never uses
    _rc=${PIPESTATUS[0]}
fi
(return 0 2>/dev/null) && return "$_rc" || exit "$_rc"
