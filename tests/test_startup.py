"""Start-up choices: dtype "auto" (vLLM's name: bfloat16 on accelerators and on CPUs that multiply bfloat16
natively, float32 on other CPUs; the default of LLM and the CLI), and the persistent compilation cache."""

import inspect

import jax.numpy as jnp
import pytest

import gemma4_jax
from gemma4_jax import cli
from gemma4_jax.model import resolve_dtype


@pytest.mark.parametrize("native", [True, False])
def test_auto_per_platform(monkeypatch, native):
    from gemma4_jax import model as model_lib

    monkeypatch.setattr(model_lib, "cpu_multiplies_bf16", lambda: native)
    cpu = jnp.bfloat16 if native else jnp.float32
    assert resolve_dtype("auto", platform="cpu") == cpu
    assert resolve_dtype("auto", platform="gpu") == jnp.bfloat16
    assert resolve_dtype("auto") == cpu  # the test machine is a CPU
    assert resolve_dtype("bfloat16", platform="cpu") == jnp.bfloat16
    assert resolve_dtype("float32", platform="gpu") == jnp.float32
    with pytest.raises(ValueError, match=r"dtype 'float8' is not supported; choose one of \['auto', 'bfloat16'"):
        resolve_dtype("float8")


def test_llm_and_cli_default_to_auto():
    model = gemma4_jax.from_config("tiny", dtype="auto")
    assert model.dtype == resolve_dtype("auto")
    assert inspect.signature(gemma4_jax.LLM.__init__).parameters["dtype"].default == "auto"
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses a name it does not know
        cli.main(["generate", "--dtype", "float8"])
    assert exit_info.value.code == 2


def test_compilation_cache_dir(monkeypatch, tmp_path):
    """On by default in a per-user directory; the environment moves or disables it; JAX's own setting wins."""
    import jax

    from gemma4_jax.serving import compilation_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    assert compilation_cache.default_dir() == str(tmp_path / "xdg" / "gemma4-jax" / "jax-compilation")
    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.default_dir() is None
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "moved"))
    assert compilation_cache.default_dir() == str(tmp_path / "moved")
    assert jax.config.jax_compilation_cache_dir is None  # off in tests (conftest)
    try:
        assert compilation_cache.enable(False) is None and not jax.config.jax_compilation_cache_dir
        assert compilation_cache.enable() == str(tmp_path / "moved") == jax.config.jax_compilation_cache_dir
        assert (tmp_path / "moved").is_dir()
        assert compilation_cache.enable(str(tmp_path / "other")) == str(tmp_path / "moved")  # already set: kept
    finally:
        compilation_cache.disable()  # nothing later in the suite may write to (or read from) this directory


def test_compilation_cache_repairs_entries_without_access_time(tmp_path):
    """Entries written without the size bound (no -atime file) must not break every later write: JAX's eviction
    scan reads each entry's access time before writing. A cache with one such entry still caches a new program."""
    import jax
    import jax.numpy as jnp

    from gemma4_jax.serving import compilation_cache

    old = tmp_path / "jit_old-0123-cache"
    old.write_bytes(b"x" * 10)
    try:
        assert compilation_cache.enable(str(tmp_path)) == str(tmp_path)
        assert int.from_bytes((tmp_path / "jit_old-0123-atime").read_bytes(), "little") == old.stat().st_mtime_ns
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(5)).block_until_ready()
        written = [p.name for p in tmp_path.iterdir() if p.name.startswith("jit__lambda") and p.name.endswith("-cache")]
        assert written, sorted(p.name for p in tmp_path.iterdir())
    finally:
        compilation_cache.disable()


def test_logprob_counts_share_one_compiled_step():
    """logprobs=1..20 are one static value of the step: after the first request asking for logprobs, other counts
    compile nothing (they used to compile once per power of two)."""
    from gemma4_jax import SamplingParams

    llm = gemma4_jax.LLM(gemma4_jax.from_config("tiny", dtype="float32"), max_num_seqs=2, max_model_len=64,
                         compilation_cache=False)
    prompt = [[2, 5, 6, 7]]
    outs = llm.generate(prompt, SamplingParams(max_tokens=3, logprobs=1), use_tqdm=False)
    assert len(outs[0].logprobs[0].top) == 1
    compiles = llm.engine.stats["compiles"]
    for n in (2, 5, 20, 3):
        out = llm.generate(prompt, SamplingParams(max_tokens=3, logprobs=n), use_tqdm=False)[0]
        assert [len(lp.top) for lp in out.logprobs] == [n] * 3
        assert out.logprobs[0].top[0][1] >= out.logprobs[0].top[-1][1]  # best first
    assert llm.engine.stats["compiles"] == compiles
