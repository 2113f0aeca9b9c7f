"""CPU few-row weight products: an XLA FFI custom call (cpu_matmul.cc) that streams each weight once per step for
the decode of small batches, built on first use (kernels/cpu_build.py). reference.py is what it must equal;
test_cpu_matmul.py compares the two. `gemma4_jax.layers.weight_einsum` routes few-row products to it on CPU.
"""

from gemma4_jax.kernels.cpu_matmul.kernel import cpu_matmul, load
from gemma4_jax.kernels.cpu_matmul.reference import matmul_reference

__all__ = ["cpu_matmul", "load", "matmul_reference"]
