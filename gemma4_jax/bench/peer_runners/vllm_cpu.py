"""Runner for vLLM's CPU build (see _protocol.py), in its own venv (benchmarks/install_peers.sh).

One `LLM` with `max_num_seqs` = the largest batch; batch B means B prompts per `generate` call (batch 1: one
prompt at a time). Token ids go in directly (`skip_tokenizer_init`: the bench checkpoint has no tokenizer).
On a small shared machine vLLM CPU needs `VLLM_CPU_NUM_OF_RESERVED_CPU=0` (it reserves a core for its frontend
otherwise), a KV cache size that fits (`VLLM_CPU_KVCACHE_SPACE`, GiB) and a low `gpu_memory_utilization`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _protocol  # noqa: E402

os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def make(spec):
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    options = spec.get("options", {})
    llm = LLM(
        model=spec["checkpoint"],
        skip_tokenizer_init=True,
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        max_num_seqs=max(spec["batch_sizes"]),
        max_num_batched_tokens=options.get("max_num_batched_tokens") or 2048,
        gpu_memory_utilization=options.get("gpu_memory_utilization", 0.3),
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True, detokenize=False)

    def run_batch(prompts):
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    info = {
        "version": f"vllm {vllm.__version__}",
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")},
    }
    return _protocol.batched(run_batch), info


if __name__ == "__main__":
    _protocol.serve(make)
