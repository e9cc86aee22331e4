#!/usr/bin/env bash
# Packs what the GPU machine lacks for the DALI and FFCV figures (issues 5 and 6) into .carry/p1 .. .carry/pK,
# each under the device tool's 64 MiB per call, to be carried one per call to a warm machine and unpacked
# there by .ci/device_unpack.sh. That machine has python3.12 with torch, numba and opencv-python-headless but
# can fetch nothing; this one (python3.11, ffcv built against Debian's OpenCV) has everything installed in
# .venv. Contents of the one compressed tar that is split into the parts:
#   site/  files to copy into the device python's site-packages: nvidia-dali-cuda120 with nvImageCodec,
#          nvCOMP and nvJPEG (cu12; only the cp312 extension modules), DALI's and ffcv's pure-python deps,
#          cp312 wheels of libcst / nvtx / optree unpacked, and ffcv itself (its C extension is loaded through
#          ctypes and uses no version-specific Python API, so it is renamed to a plain _libffcv.so);
#   lib/   the shared libraries ffcv's extension links (OpenCV core/imgproc, libjpeg-turbo, their closure),
#          put on LD_LIBRARY_PATH there.
#
#   bash .ci/device_bundle.sh [VENV]     # ~10 min of xz on 2 cores; prints the carry plan
set -euo pipefail

VENV="${1:-.venv}"
PART_MIB=${PART_MIB:-56}   # + the working tree (a few MiB) stays under the 64 MiB a call carries
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VENV/bin/python" -c "import nvidia.dali, ffcv.libffcv" || {
    echo "error: $VENV lacks DALI or ffcv; run bash .ci/install_dali.sh $VENV and bash .ci/install_ffcv.sh $VENV" >&2
    exit 2
}
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/site/nvidia" "$STAGE/lib" "$STAGE/whl"

# DALI and the NVIDIA libraries it loads; extension modules for other Python versions are left behind.
for pkg in dali nvimgcodec libnvcomp nvjpeg; do
    tar -C "$SP/nvidia" -cf - --exclude='__pycache__' --exclude='dali/include' --exclude='nvimgcodec/include' \
        --exclude='*.cpython-3[!1]*-x86_64-linux-gnu.so' --exclude='*.cpython-31[!2]*-x86_64-linux-gnu.so' \
        --exclude='*.cpython-312t-x86_64-linux-gnu.so' "$pkg" | tar -C "$STAGE/site/nvidia" -xf -
done
ls "$STAGE/site/nvidia/dali"/backend_impl.cpython-312-x86_64-linux-gnu.so >/dev/null
cp -r "$SP"/nvidia_dali_cuda120-*.dist-info "$SP"/nvidia_nvimgcodec_cu12-*.dist-info \
      "$SP"/nvidia_libnvcomp_cu12-*.dist-info "$SP"/nvidia_nvjpeg_cu12-*.dist-info "$STAGE/site/"

# Dependencies: wheels for cp312 where the index has them; assertpy and fastargs exist only as sdists of pure
# Python, copied from this venv.
"$VENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$STAGE/whl" \
    astunparse==1.6.3 gast==0.7.0 makefun==1.16.0 libcst==1.9.0 nvtx==0.2.17 optree==0.20.0 \
    terminaltables==3.1.10 pytorch-pfn-extras==0.9.0 2>/dev/null
for w in "$STAGE"/whl/*.whl; do "$VENV/bin/python" -m zipfile -e "$w" "$STAGE/site/"; done
for pkg in assertpy fastargs; do
    cp -r "$SP/$pkg" "$STAGE/site/"
done

# ffcv: the package, its extension under a version-neutral name, and the libraries that extension links.
tar -C "$SP" -cf - --exclude='__pycache__' ffcv | tar -C "$STAGE/site" -xf -
ext=$(ls "$STAGE"/site/ffcv/_libffcv.cpython-*.so)
mv "$ext" "$STAGE/site/ffcv/_libffcv.so"
ldd "$STAGE/site/ffcv/_libffcv.so" | awk '/=> \//{print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
        libc.so.*|libm.so.*|libstdc++.so.*|libgcc_s.so.*|ld-linux*|libpthread.so.*|libdl.so.*|librt.so.*) ;;
        *) cp -L "$lib" "$STAGE/lib/" ;;
    esac
done

mkdir -p "$ROOT/.carry"
rm -rf "$ROOT"/.carry/p*
echo "device_bundle: $(du -sh "$STAGE/site" | cut -f1) of site-packages, $(du -sh "$STAGE/lib" | cut -f1) of libraries; compressing"
tar -C "$STAGE" -cf - site lib | xz -T0 -9 | split -d -a 2 -b "${PART_MIB}M" - "$STAGE/part."
i=0
for f in "$STAGE"/part.*; do
    i=$((i + 1))
    mkdir -p "$ROOT/.carry/p$i"
    mv "$f" "$ROOT/.carry/p$i/bundle.part"
done
for ((k = 1; k <= i; k++)); do  # each part names its own checksum and the count, so a missing one is seen
    (cd "$ROOT/.carry/p$k" && sha256sum bundle.part >bundle.sha256 && echo "$i" >parts)
done
echo "device_bundle: $i parts of at most $PART_MIB MiB in .carry/; carry them one per call to a warm machine:"
for ((k = 1; k <= i; k++)); do
    echo "  run(carry=[\".carry/p$k\"], command=\"du -sh .carry/p$k\")"
done
echo "  then every later call starts: bash .ci/device_unpack.sh && ...  (it checks the parts' checksums)"
