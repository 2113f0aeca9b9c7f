"""dtype "auto" (vLLM's name): float32 on CPU, where XLA's bfloat16 dots are several times slower, bfloat16 on
accelerators; it is the default of LLM and the CLI, and explicit names are kept."""

import inspect

import jax.numpy as jnp
import pytest

import gemma4_jax
from gemma4_jax import cli
from gemma4_jax.model import resolve_dtype


def test_auto_per_platform():
    assert resolve_dtype("auto", platform="cpu") == jnp.float32
    assert resolve_dtype("auto", platform="gpu") == jnp.bfloat16
    assert resolve_dtype("auto") == jnp.float32  # the test machine is a CPU
    assert resolve_dtype("bfloat16", platform="cpu") == jnp.bfloat16
    with pytest.raises(ValueError, match=r"dtype 'float8' is not supported; choose one of \['auto', 'bfloat16'"):
        resolve_dtype("float8")


def test_llm_and_cli_default_to_auto():
    model = gemma4_jax.from_config("tiny", dtype="auto")
    assert model.dtype == jnp.float32
    assert inspect.signature(gemma4_jax.LLM.__init__).parameters["dtype"].default == "auto"
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses a name it does not know
        cli.main(["generate", "--dtype", "float8"])
    assert exit_info.value.code == 2
