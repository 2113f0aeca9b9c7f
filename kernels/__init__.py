"""Pallas / Triton kernels of gemma4-jax, installed as `gemma4_jax.kernels`.

One sub-package per kernel, each with the kernel, a pure-jnp reference beside it and tests that run the kernel in
interpret mode on CPU against the reference (DESIGN.md decision 6). Dispatch between kernel and reference happens
in one place per op, in the model code that uses it.
"""
