#!/usr/bin/env bash
# The GPU check's setup (issue 25): a bare GPU machine with no network has Python 3.12 and its own torch,
# numpy, scipy, scikit-image, matplotlib, pandas, timm..., but not nnU-Net and the packages below.
#
#   bash benchmarks/gpu_setup.sh fetch                 # HERE (PyPI reachable), once: the wheels into .whl/
#   bash benchmarks/gpu_setup.sh check --out "$OUT"    # THERE: install .whl/ + this working tree into
#                                                      # /tmp/site, then benchmarks/gpu_check.py --device cuda
#
# fetch: downloads exactly the versions this project is tested with, for CPython 3.12 on manylinux x86-64
# (GPU_CHECK_PYTHON=3.11 for another Python), builds acvl-utils' wheel from its source release (PyPI has
# no wheel of it), and recompresses SimpleITK's wheel with LZMA (its 270 MB library: 53 MB deflated, 29 MB
# with LZMA; pip unpacks either): the working tree that travels to the GPU machine is limited to 64 MiB.
# .whl/ is in .gitignore; the device tool's `carry` must name it.
# check: any further arguments go to gpu_check.py (e.g. --quick, --budget 300, --parts train attack).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
PY=${GPU_CHECK_PYTHON:-3.12}
PIP=${PIP:-python3 -m pip}
# what nnunetv2 2.8.1 imports that the GPU machine lacks (nnU-Net's other requirements are there, or never
# imported on this path: imagecodecs, graphviz, yacs, pydantic; batchgenerators' future/unittest2)
BINARY=(simpleitk==2.5.7 blosc2==4.15.0 ndindex==1.10.1 connected-components-3d==4.1.1)
PURE=(nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6
      nibabel==5.4.2)
SOURCE_ONLY=(acvl-utils==0.2.6)

fetch() {
  local t0=$SECONDS platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
  mkdir -p "$WHL"
  $PIP download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp "${platforms[@]}" \
       -d "$WHL" "${BINARY[@]}" "${PURE[@]}"
  $PIP wheel -q --no-deps -w "$WHL" "${SOURCE_ONLY[@]}"
  python3 - "$WHL" <<'EOF'
import sys, zipfile
from pathlib import Path
# LZMA members are standard zip (method 14), read by Python's zipfile and so by pip; RECORD's hashes are of
# the unpacked files, which do not change
for whl in Path(sys.argv[1]).glob("simpleitk-*.whl"):
    with zipfile.ZipFile(whl) as z:
        if all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist()):
            continue
        tmp = whl.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as out:
            for info in z.infolist():
                out.writestr(info, z.read(info), compress_type=zipfile.ZIP_LZMA)
    tmp.replace(whl)
EOF
  local mib
  mib=$(du -cm "$WHL"/*.whl | tail -1 | cut -f1)
  ls -1 "$WHL"
  echo "gpu_setup.sh: $(ls "$WHL"/*.whl | wc -l) wheels, ${mib} MiB in $WHL/ ($((SECONDS - t0)) s); carry: [\"$WHL\"]"
  if (( mib > 56 )); then echo "gpu_setup.sh: $WHL/ is over 56 MiB: with the working tree it may not fit in 64 MiB" >&2; exit 1; fi
}

check() {
  if ! ls "$WHL"/*.whl >/dev/null 2>&1; then
    echo "gpu_setup.sh: no wheels in $WHL/: run 'bash benchmarks/gpu_setup.sh fetch' where PyPI is reachable, and name $WHL in the device tool's carry" >&2
    exit 2
  fi
  local t0
  t0=$(date +%s.%N)
  # one pip call: the wheels and this working tree (built with the machine's own setuptools, no network)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
          --target "$SITE" "$WHL"/*.whl . || { echo "gpu_setup.sh: pip install failed" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
  GPU_CHECK_INSTALL_S=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
  export GPU_CHECK_INSTALL_S
  echo "gpu_setup.sh: installed into $SITE in ${GPU_CHECK_INSTALL_S} s"
  exec python3 benchmarks/gpu_check.py --device "${GPU_CHECK_DEVICE:-cuda}" "$@"
}

case "${1:-}" in
  fetch) fetch ;;
  check) shift; check "$@" ;;
  *) echo "usage: bash benchmarks/gpu_setup.sh fetch | check --out DIR [gpu_check.py arguments]" >&2; exit 2 ;;
esac
