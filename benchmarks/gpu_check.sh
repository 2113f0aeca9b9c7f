#!/usr/bin/env bash
# The prepared device check (issue 12): GPU-only kernel tests, then the attention backends side by side, as one
# JSON + markdown table under benchmarks/gpu_check_out (or --out DIR). On a CPU pass --reduced (interpret mode,
# tiny shapes) to check that the script runs end to end. See benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
