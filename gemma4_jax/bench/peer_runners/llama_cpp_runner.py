"""Runner for llama.cpp through llama-cpp-python's C bindings (see _protocol.py), in its own venv.

llama-cpp-python's high-level `Llama` object decodes one sequence at a time, so batch B is driven through the
C API the way llama.cpp's own `batched` example does it: one context per batch size with `n_seq_max` = B (each
sequence owns `max_model_len` cells of the KV cache), the B prompts prefilled together in `llama_batch`es of
`n_batch` tokens (logits only at each prompt's last token), then one decode step per new token holding one token
of every sequence, greedy argmax of the logits on the host. The GGUF file is made by peers.py with the converter
that llama-cpp-python's source ships. (This file is not named llama_cpp.py: its folder is first on sys.path, so
that name would shadow the package it drives.)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _protocol  # noqa: E402

N_BATCH = 2048  # tokens per llama_decode call in the prefill (llama.cpp's default logical batch)
# The KV cache in the checkpoint's dtype, as the other systems keep it (llama.cpp's default is float16, which makes
# greedy tokens drift from the float32 systems within a few tokens). ggml.h: GGML_TYPE_F32 = 0, GGML_TYPE_BF16 = 30
# (the bindings do not export the latter).
KV_CACHE_TYPES = {"float32": 0, "bfloat16": 30}


def make(spec):
    import llama_cpp as lib
    import numpy as np

    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(spec["checkpoint"].encode(), lib.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {spec['checkpoint']}")
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    threads = spec.get("threads") or os.cpu_count()
    contexts = {}
    for batch in spec["batch_sizes"]:
        params = lib.llama_context_default_params()
        params.n_ctx = batch * spec["max_model_len"]
        params.n_seq_max = batch
        params.n_batch = N_BATCH
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        params.type_k = params.type_v = KV_CACHE_TYPES[spec["dtype"]]
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for batch {batch}")
        contexts[batch] = ctx
    buf = lib.llama_batch_init(N_BATCH, 0, 1)

    def decode(ctx, entries):
        """One llama_decode over (token, position, sequence, wants_logits) entries; argmax of each output row."""
        buf.n_tokens = len(entries)
        for i, (token, pos, seq, wants) in enumerate(entries):
            buf.token[i] = token
            buf.pos[i] = pos
            buf.n_seq_id[i] = 1
            buf.seq_id[i][0] = seq
            buf.logits[i] = wants
        rc = lib.llama_decode(ctx, buf)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n_out = sum(e[3] for e in entries)
        if not n_out:
            return []
        logits = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(n_out * n_vocab,))
        return logits.reshape(n_out, n_vocab).argmax(axis=-1).tolist()

    def run(prompts, batch):
        ctx = contexts[batch]
        tokens: list[list[int]] = []
        for start in range(0, len(prompts), batch):
            group = prompts[start : start + batch]
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            entries = [(t, pos, seq, pos == len(p) - 1) for seq, p in enumerate(group) for pos, t in enumerate(p)]
            last = []
            for chunk in range(0, len(entries), N_BATCH):
                last += decode(ctx, entries[chunk : chunk + N_BATCH])
            out = [[t] for t in last]
            for step in range(spec["output_len"] - 1):
                step_entries = [(o[-1], len(p) + step, seq, True) for seq, (p, o) in enumerate(zip(group, out))]
                for o, t in zip(out, decode(ctx, step_entries)):
                    o.append(t)
            tokens.extend(out)
        return tokens

    info = {
        "version": f"llama-cpp-python {lib.__version__}",
        "threads": threads,
        "system_info": lib.llama_print_system_info().decode(errors="replace").strip(),
    }
    return run, info


if __name__ == "__main__":
    _protocol.serve(make)
