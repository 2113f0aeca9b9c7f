"""The CLI speaks vLLM's flags: positional model, -tp/-pp/-dp, KV sizing, --version, per-subcommand usage on an
unknown flag, refusals for what cannot work here (instead of silently ignoring it), and `serve` exiting non-zero
when the model cannot load."""

import subprocess
import sys

import pytest

from gemma4_jax import cli
from gemma4_jax.version import __version__


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gemma4_jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"gemma4-jax {__version__}"


def test_unknown_flag_prints_the_subcommand_usage():
    out = run("generate", "--no-such-flag")
    assert out.returncode == 2
    assert "usage: gemma4-jax generate" in out.stderr and "unrecognized arguments: --no-such-flag" in out.stderr


def test_flag_refusals(tmp_path, capsys):
    assert cli.main(["generate", "--gpu-memory-utilization", "0.9", str(tmp_path)]) == 2
    assert "size it with --kv-cache-memory-gb" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path), "--model", str(tmp_path / "other")]) == 2
    assert "two models given" in capsys.readouterr().err
    assert cli.main(["generate", "-tp", "2"]) == 2  # the demo model is one device
    assert "runs on one device" in capsys.readouterr().err
    assert cli.main(["generate", "--decode-attention-backend", "nope"]) == 2
    assert "decode attention backend 'nope' is not supported" in capsys.readouterr().err
    assert cli.main(["generate", "-tp", "2"]) == 2
    assert "runs on one device" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: only "auto" is a KV cache dtype here
        cli.main(["generate", "--kv-cache-dtype", "fp8"])


def test_generate_takes_vllm_engine_flags(capsys):
    code = cli.main(["generate", "--max-tokens", "2", "--block-size", "8", "--num-gpu-blocks-override", "64",
                     "--enable-auto-tool-choice", "--tool-call-parser", "gemma4", "--quiet",
                     "--prefill-attention-backend", "xla", "--decode-attention-backend", "auto"])
    assert code == 0
    assert "2 generated tokens" in capsys.readouterr().err


def test_serve_exits_non_zero_when_the_model_cannot_load(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    out = run("serve", str(tmp_path), "--port", "0", timeout=180)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "the model failed to load" in out.stderr


def test_cli_limit_defaults_are_the_engine_defaults():
    """The CLI leaves the limits unset and fills in EngineConfig's defaults (smaller ones for the demo under serve,
    whose warm-up would otherwise compile ~700 shapes); the two tables must agree."""
    from gemma4_jax.serving.engine import EngineConfig

    for name, value in cli.ENGINE_DEFAULTS.items():
        assert getattr(EngineConfig(), name) == value
    assert set(cli.DEMO_SERVE_LIMITS) == {"max_num_seqs", "max_model_len", "max_num_batched_tokens"}
