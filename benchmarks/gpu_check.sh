#!/usr/bin/env bash
# The prepared device check (issue 12): machine ceilings, GPU-marked kernel tests, the stack on the GPU, the
# attention and FP4 expert kernels against XLA, whole presets with random weights; one JSON + markdown table under
# $OUT (or benchmarks/gpu_check_out, or --out DIR). On a CPU pass --reduced (interpret mode, tiny shapes) to check
# that the script runs end to end. See benchmarks/gpu_check.py.
#
# It runs this tree as the package lays it out (gemma4_jax/, with kernels/ and serving/ inside as
# gemma4_jax.kernels and gemma4_jax.serving), copied to a scratch folder, so no install is needed and an older
# install cannot shadow it. On a machine without a package registry (the lent GPU machine), wheels of what is
# missing there (FastAPI, uvicorn, pydantic, llguidance, ...) in .whl/ are installed to a scratch folder first.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
RUN=${GPU_CHECK_DIR:-/tmp/gemma4_gpu_check}
if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$RUN-site" \
    "$REPO"/.whl/*.whl
  export PYTHONPATH=$RUN-site${PYTHONPATH:+:$PYTHONPATH}
fi
rm -rf "$RUN" && mkdir -p "$RUN"
cp -r "$REPO/gemma4_jax" "$REPO/benchmarks" "$REPO/conftest.py" "$RUN/"
cp -r "$REPO/kernels" "$RUN/gemma4_jax/kernels" && cp -r "$REPO/serving" "$RUN/gemma4_jax/serving"
export PYTHONPATH=$RUN${PYTHONPATH:+:$PYTHONPATH}
cd "$RUN"
exec $PY benchmarks/gpu_check.py --repo "$REPO" "$@"
