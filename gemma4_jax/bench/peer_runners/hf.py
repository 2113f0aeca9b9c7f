"""Runner for HF transformers `generate` (see _protocol.py): greedy, exactly output_len new tokens, batches of B.

Runs in our own environment (transformers and torch are test dependencies of gemma4-jax). The model is loaded in
the spec's dtype with transformers' default attention (sdpa) and torch's default thread count.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _protocol  # noqa: E402


def make(spec):
    import torch
    import transformers
    from transformers import Gemma4ForCausalLM

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    model = Gemma4ForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    new_tokens = spec["output_len"]

    def run_batch(prompts):
        ids = torch.tensor(prompts, dtype=torch.int64)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        return out[:, ids.shape[1] :].tolist()

    info = {
        "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
    }
    return _protocol.batched(run_batch), info


if __name__ == "__main__":
    _protocol.serve(make)
