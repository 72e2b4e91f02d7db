#!/usr/bin/env bash
# Build mmssm's environment in a project-local virtual environment (.venv).
#
# Safe to re-run: every step checks what is already there. The mmcv wheel
# (built from its sdist with compiled ops, ~11 min on 2 cores) is cached in
# ${MMSSM_WHEEL_CACHE:-~/.cache/mmssm/wheels}, outside the checkout, so a
# second install on the same machine takes seconds.
#
# Environment:
#   MMSSM_VENV         venv folder (default: <repo>/.venv)
#   MMSSM_WHEEL_CACHE  mmcv wheel cache (default: ~/.cache/mmssm/wheels)
#   MMSSM_EXTRAS       extras of mmssm to install, e.g. "cuda" on a GPU machine
#   MMSSM_WITH_OPS=0   do not build mmssm's compiled kernels
#   MMSSM_WITH_AVX2=0  build only the generic kernels, not the AVX2+FMA ones
#   MMSSM_NATIVE=1     build the kernels with -march=native (for this CPU only;
#                      the default builds run on any x86-64, the AVX2 one
#                      loaded where the CPU has AVX2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMSSM_VENV:-$ROOT/.venv}"
CACHE="${MMSSM_WHEEL_CACHE:-$HOME/.cache/mmssm/wheels}"
PYTHON_BIN="${PYTHON:-python3.11}"
MMCV_VERSION=2.1.0

STEP=''
step() { STEP="$1"; echo "[install] $1"; }
trap 'echo "[install] FAILED at step: $STEP" >&2' ERR

step 'create the virtual environment'
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

step 'install torch 2.14.1 + torchvision 0.29.1 and build tools'
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1 wheel ninja numpy
# mmcv's setup.py imports pkg_resources, gone from setuptools >= 70. torch's
# metadata asks for a newer setuptools, which it does not need at run time.
"${PIP[@]}" 'setuptools<70'

step "provide mmcv $MMCV_VERSION with compiled ops"
mkdir -p "$CACHE"
have_mmcv() {
  "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" \
    >/dev/null 2>&1
}
if ! have_mmcv; then
  wheel=$(ls "$CACHE"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    step "build the mmcv $MMCV_VERSION wheel from its sdist (about 11 minutes)"
    build=$(mktemp -d)
    "$PY" -m pip download --disable-pip-version-check -q --no-deps \
      --no-binary :all: "mmcv==$MMCV_VERSION" -d "$build"
    tar -xzf "$build"/mmcv-"$MMCV_VERSION".tar.gz -C "$build"
    # torch 2.14's headers need C++20; mmcv 2.1.0 forces C++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$build/mmcv-$MMCV_VERSION/setup.py"
    "${PIP[@]}" addict packaging pyyaml yapf opencv-python
    (cd "$build/mmcv-$MMCV_VERSION" &&
      MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip wheel -q \
        --no-build-isolation --no-deps -w "$build/dist" .)
    built=$(ls "$build"/dist/mmcv-*.whl)
    # Copy then rename, so the cache never holds a half-written wheel.
    cp "$built" "$CACHE/.partial.whl"
    mv "$CACHE/.partial.whl" "$CACHE/$(basename "$built")"
    rm -rf "$build"
    wheel="$CACHE/$(basename "$built")"
  fi
  step "install the cached mmcv wheel $(basename "$wheel")"
  "${PIP[@]}" "$wheel"
  have_mmcv
fi

step 'install mmengine, mmdet, mmsegmentation, timm, pycocotools, test tools'
"${PIP[@]}" -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt"

step 'install mmssm in editable mode (builds mmssm._ext and mmssm._ext_avx2 from kernels/)'
extras=''
[ -n "${MMSSM_EXTRAS:-}" ] && extras="[$MMSSM_EXTRAS]"
"${PIP[@]}" --no-build-isolation --no-deps -e "$ROOT$extras"

step 'check the environment'
"$PY" - <<'PY'
import mmcv, mmcv.ops, mmdet, mmengine, mmseg, torch  # noqa: F401
import mmssm.ops
print(f'[install] ok: torch {torch.__version__}, mmcv {mmcv.__version__}, '
      f'mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, '
      f'mmssm {mmssm.__version__}, kernel: {mmssm.ops.ext_status()}')
PY
