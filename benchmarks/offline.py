"""Offline throughput/latency benchmark: a thin wrapper of `gemma4-jax bench` (see docs/benchmarks.md).

Usage: python benchmarks/offline.py --preset bench-100m --concurrency 64,1 --hf-baseline --hf-batch-sizes 8,1
"""

import sys

from gemma4_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
