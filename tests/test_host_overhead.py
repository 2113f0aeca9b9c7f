"""Host work of an engine step that would grow with the model: the parameter state is flattened once
(model.FlatState) and the graphdef hashed once (model.StaticGraph), so dispatching a step runs no Python callback
per parameter (docs/benchmarks.md, "Host overhead of an engine step")."""

import cProfile
import pstats

import jax
import numpy as np

import gemma4_jax
from gemma4_jax import SamplingParams
from gemma4_jax.model import FlatState, merge


def test_flat_state_is_cached_and_round_trips():
    model = gemma4_jax.from_config("tiny", dtype="float32")
    flat = model.flat_state
    assert model.flat_state is flat  # flattened once
    assert len(flat.leaves) == len(jax.tree.leaves(model.state))
    rebuilt = flat.unflatten()
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(model.state), strict=True):
        assert a is b
    # jit sees one node over the same leaves, and rebuilds the module from it
    logits = jax.jit(lambda s, ids: merge(model.static_graph, s).embed(ids)[0])(flat, np.array([[3, 4]]))
    np.testing.assert_array_equal(logits, model.module.embed(np.array([[3, 4]]))[0])
    model.state = jax.tree.map(lambda x: x, model.state)  # a replaced state is flattened again
    assert model.flat_state is not flat and isinstance(model.flat_state, FlatState)


def test_engine_step_runs_no_callback_per_parameter():
    llm = gemma4_jax.LLM(gemma4_jax.from_config("tiny", dtype="float32"), max_num_seqs=2, max_model_len=64,
                         page_size=4, max_num_batched_tokens=16)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request([2, 30, 31, 32], params)
    for _ in range(3):  # prefill and the first decode steps: every compile happens here
        engine.step()
    profile = cProfile.Profile()
    profile.enable()
    engine.step()  # a decode step
    profile.disable()
    calls = {func[2]: stats[1] for func, stats in pstats.Stats(profile).stats.items()}
    assert "_variable_flatten" not in calls, "the step flattened nnx Variables: pass model.flat_state"
    assert calls.get("__hash__", 0) < 50, "the step hashed a graph: pass model.static_graph"
