"""Pallas / Triton kernels and CPU custom calls of gemma4-jax, installed as `gemma4_jax.kernels`.

One folder per kernel, each with the kernel, a pure-jnp reference beside it and tests that run the kernel in
interpret mode on CPU against the reference (DESIGN.md decision 6). A leaf: kernels import jax (and numpy) only.
Each op has one dispatch function that picks the kernel on GPU and the reference elsewhere; docs/kernels.md
describes layouts, tiling and dispatch.

- `fp4_grouped_matmul/`: MoE grouped matmul against packed NVFP4 experts.
- `paged_attention/`: decode and prefill attention over paged K/V pools and sliding-window rings, read in place.
- `cpu_attention/`: the same attention on CPU as a C++ XLA FFI custom call (reference: paged_attention's).
- `cpu_matmul/`: few-row weight products on CPU as a C++ custom call, for small-batch decode.
- `cpu_sampler/`: the sampler's row reductions (max, first argmax, summed exponentials) on CPU as a C++ custom call.
- `cpu_build.py`: compiles the C++ sources on first use (the machine's compiler, `-march=native`) and registers them.
"""
