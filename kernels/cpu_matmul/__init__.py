"""CPU weight products: an XLA FFI custom call (cpu_matmul.cc), built on first use (kernels/cpu_build.py), that
streams each weight once per step for few rows and runs packed panels of bfloat16 pairs for many (with the LM
head's float32 soft-capped epilogue), and few-row products of several weights sharing one input in one call
(cpu_matmul_fused.cc: q/k/v, gate/up). reference.py is what it must equal; test_cpu_matmul.py compares the two.
`gemma4_jax.layers.weight_einsum` and `logits_einsum` route products to it on CPU.
"""

from gemma4_jax.kernels.cpu_matmul.kernel import (
    MANY_ROWS,
    cpu_matmul,
    cpu_matmul_gate_up,
    cpu_matmul_multi,
    load,
    takes_packed,
    vectors_on_this_cpu,
)
from gemma4_jax.kernels.cpu_matmul.reference import gate_up_reference, matmul_reference, multi_reference

__all__ = ["MANY_ROWS", "cpu_matmul", "cpu_matmul_gate_up", "cpu_matmul_multi", "gate_up_reference", "load",
           "matmul_reference", "multi_reference", "takes_packed", "vectors_on_this_cpu"]
