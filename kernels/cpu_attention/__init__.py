"""CPU paged attention: an XLA FFI custom call (cpu_attention.cc) that reads the K/V pools in place through the
page table, built on first use with the machine's C++ compiler (kernels/cpu_build.py). Its reference is the
paged-attention reference (kernels/paged_attention/reference.py); test_cpu_attention.py compares the two. The `cpu`
attention backend (gemma4_jax/cpu_attention.py) puts it behind the backend seam.
"""

from gemma4_jax.kernels.cpu_attention.kernel import cpu_paged_attention, load

__all__ = ["cpu_paged_attention", "load"]
