"""Ours against HF transformers, vLLM CPU and llama.cpp on the same weights: a thin wrapper of
`gemma4-jax bench --peers` (see docs/benchmarks.md, "Peers, same weights, interleaved").

Usage: benchmarks/install_peers.sh && python benchmarks/peers.py [--peer-dtypes float32,bfloat16] [--windows 3]
"""

import sys

from gemma4_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--peers", *sys.argv[1:]]))
