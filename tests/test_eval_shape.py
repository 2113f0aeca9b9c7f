"""The real family sizes through jax.eval_shape: shapes and parameter counts with no memory."""

import numpy as np
import pytest
from flax import nnx

import gemma4_jax
from helpers import flat_state

# Text-model parameters (towers excluded). 26B-A4B and 31B match their published totals (25.2B, 30.7B); E2B/E4B's
# "effective" sizes (2.3B, 4.5B) are these totals less the per-layer-embedding table.
EXPECTED = {
    "e2b": (4.629e9, 2.349e9),
    "e4b": (7.463e9, 2.819e9),
    "26b-a4b": (25.233e9, 0.0),
    "31b": (30.697e9, 0.0),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_sizes(name):
    _, state = gemma4_jax.abstract_model(name, dtype="bfloat16")
    flat = list(nnx.to_flat_state(state))
    assert all(isinstance(v.get_value(), __import__("jax").ShapeDtypeStruct) for _, v in flat)  # no memory used
    total = sum(int(np.prod(v.shape)) for _, v in flat)
    ple = sum(int(np.prod(v.shape)) for p, v in flat if p[0] == "embed_tokens_per_layer")
    cfg = gemma4_jax.preset(name).text
    print(f"\n{name}: {total / 1e9:.3f}B parameters ({(total - ple) / 1e9:.3f}B without PLE), "
          f"{total * 2 / 2**30:.1f} GiB in bf16, KV {cfg.kv_bytes_per_token()} bytes/token")
    want_total, want_ple = EXPECTED[name]
    assert abs(total - want_total) / want_total < 1e-3
    assert abs(ple - want_ple) <= 1e-3 * want_total
    shapes = {name: tuple(v.shape) for name, v in flat_state(state).items()}
    assert shapes["embed_tokens.embedding"] == (262144, cfg.hidden_size)
    full = next(s for s in cfg.layers if s.attention_type == "full_attention")
    assert shapes[f"layers.{full.index}.self_attn.q_proj.kernel"] == (cfg.hidden_size, cfg.num_attention_heads, 512)
