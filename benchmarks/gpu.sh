#!/usr/bin/env bash
# The GPU check, as one script: the CUDA test subset, then the benchmark cases on CUDA against
# torch.func in the same process (warm time per call, ratios, largest error), on the card's name.
#
#     bash benchmarks/gpu.sh            # with the python whose torch has CUDA (python3, or $PYTHON)
#
# It installs nothing but xa's small pure-Python dependencies beside the torch already there
# (GPU images ship their own torch: 2.11 or newer). Results go to $OUT/gpu (default /tmp/xa-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/xa-gpu}/gpu
mkdir -p "$OUT_DIR"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"
"$PY" -m pip install --quiet --disable-pip-version-check opt_einsum numpy pytest hypothesis 2>/dev/null \
  || echo "(pip could not install; using what is there)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
XA_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:warnings -x tests/test_operators.py tests/test_composite.py \
  tests/test_readme.py tests/test_soundness.py tests/test_networks.py 2>&1 | tail -5 | tee "$OUT_DIR/tests.txt"
"$PY" benchmarks/run.py --device cuda --skip-jacobian --cases a,b,c,c2,c3,o,p --plot-orders 0 --reps 20 \
  --budget 20 --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.txt"
