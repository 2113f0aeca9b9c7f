"""Runner for gemma4-jax itself (see _protocol.py): `from_pretrained` on the HF directory, one `LLM` per batch size.

Run with the python of the environment gemma4_jax is installed in. Each batch size gets its own engine with
`max_num_seqs` = that batch, stepped by `gemma4_jax.bench.offline.drive` exactly as `gemma4-jax bench` does; the
engine's and XLA's compile counts during every timed run are reported (both must stay 0 after the warm-up).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _protocol  # noqa: E402


def make(spec):
    import jax

    import gemma4_jax
    from gemma4_jax.bench.offline import XlaCompiles, drive
    from gemma4_jax.serving.llm import LLM

    XlaCompiles.install()
    model = gemma4_jax.from_pretrained(spec["checkpoint"], dtype=spec["dtype"])
    options = {k: v for k, v in spec.get("options", {}).items() if v is not None}
    engines = {
        b: LLM(model, max_num_seqs=b, max_model_len=spec["max_model_len"], **options).engine
        for b in spec["batch_sizes"]
    }

    def run(prompts, batch):
        result = drive(engines[batch], prompts, spec["output_len"])
        _protocol.EXTRA.update(compiles=result["compiles"], xla_compiles=result["xla_compiles"])
        return result["tokens"]

    version = f"gemma4-jax {gemma4_jax.__version__}, jax {jax.__version__}"
    if options.get("num_scheduler_steps", 1) > 1:
        version += f", {options['num_scheduler_steps']} steps per call"
    info = {"version": version, "engine_options": options}
    return run, info


if __name__ == "__main__":
    _protocol.serve(make)
