"""The serving engine of gemma4-jax, installed as `gemma4_jax.serving`: KV pools, scheduler, jitted runner,
sampler, detokenizer, and the OpenAI-compatible HTTP server built on them."""
