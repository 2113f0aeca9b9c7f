"""The Hugging Face transformers baseline: the same checkpoint, timed with HF `generate` in the same process.

With `--hf-baseline` the random weights are made by transformers (`make_hf_checkpoint`), saved with
`save_pretrained` and loaded back by both sides, so ours and HF run the very same checkpoint, and HF runs it in the
same dtype as ours (`load_hf_model(path, dtype)`: a bfloat16 run of ours is compared with a bfloat16 HF, never
with float32). `agreement` then compares the greedy sequences. torch and transformers are imported only when a
function here runs.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma4_jax.bench.offline import cpu_seconds, load_average, peak_rss_mb, reset_peak_rss


def make_hf_checkpoint(config_dict: dict[str, Any], path: str, seed: int) -> None:
    """Random-init an HF Gemma4ForCausalLM (float32) from a config dict and `save_pretrained` it to `path`."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    kwargs = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(Gemma4TextConfig(**kwargs)).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    del model
    gc.collect()


def load_hf_model(path: str, dtype: str = "float32"):
    """Load a saved HF Gemma4ForCausalLM in eval mode, its weights cast to `dtype` ("float32", "bfloat16" or
    "float16": the dtype our side runs in, so the two timings and token streams are comparable)."""
    import torch
    from transformers import Gemma4ForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"the HF baseline runs in float32, bfloat16 or float16, not {dtype!r}")
    model = Gemma4ForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
    return model


def bench_hf(
    model, prompts: Sequence[Sequence[int]], batch_size: int, output_len: int
) -> tuple[dict[str, Any], list[list[int]]]:
    """HF `generate` (greedy, exactly output_len new tokens) over `prompts` in batches of `batch_size`."""
    import torch

    ids = torch.tensor(np.asarray(prompts, np.int64))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(batch: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        return out[:, batch.shape[1] :]

    generate(ids[:batch_size], 2)  # first-call overheads (allocator, lazy init) stay out of the timing
    reset_peak_rss()
    tokens: list[list[int]] = []
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        tokens.extend(generate(ids[start : start + batch_size], output_len).tolist())
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    n_out = sum(len(t) for t in tokens)
    return {
        "batch_size": batch_size,
        "num_prompts": len(prompts),
        "wall_s": wall,
        "output_tokens": n_out,
        "output_tok_s": n_out / wall,
        "total_tok_s": (n_out + ids.numel()) / wall,
        "torch_threads": torch.get_num_threads(),
        "cpu_utilization": cpu / wall,
        "load_avg_1m": load_average(),
        "peak_rss_mb": peak_rss_mb(),
    }, tokens


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Fraction of generated positions where both greedy sequences agree up to their first divergence.

    1.0: identical greedy tokens. After a first differing token the two continue from different contexts, so
    every later position counts as disagreeing: one near-tie early in a sequence costs the rest of it. Random
    weights give near-flat logits (many near-ties), and bfloat16 rounds them differently in each implementation, so
    a low figure there (0.01 was seen for bfloat16 on the random bench-100m) says "near-ties", not "wrong model";
    numerical parity is tested at float32 (tests/test_parity_text.py)."""
    same = total = 0
    for a, b in zip(ours, theirs, strict=False):
        total += len(b)
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            same += 1
    return same / total if total else float("nan")
