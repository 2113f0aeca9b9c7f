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


@pytest.mark.slow  # ~20 s: builds and runs the demo model
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


def test_demo_serve_limits_and_enforce_eager(monkeypatch):
    """serve on the demo model warms up with small limits (flags given win); --enforce-eager keeps the engine's
    defaults (nothing is compiled up front, so the limits cost nothing at start-up)."""
    import functools

    from gemma4_jax.serving import demo

    monkeypatch.setattr(demo, "demo_model", functools.lru_cache(demo.demo_model))  # built once (its init compiles)
    parser_args = ["serve", "--port", "0"]
    captured = {}

    def fake_serve_cli(args, build_llm):
        captured["llm"] = build_llm(args)
        captured["warmup"] = not (args.enforce_eager or args.no_warmup)
        return 0

    import gemma4_jax.serving.server as server

    original = server.serve_cli
    server.serve_cli = fake_serve_cli
    try:
        assert cli.main(parser_args) == 0
        config = captured["llm"].engine.config
        assert captured["warmup"] and (config.max_num_seqs, config.max_model_len, config.max_num_batched_tokens) == (
            4, 256, 16)
        assert cli.main([*parser_args, "--max-num-seqs", "2"]) == 0
        assert captured["llm"].engine.config.max_num_seqs == 2
        assert cli.main([*parser_args, "--enforce-eager"]) == 0
        config = captured["llm"].engine.config
        assert not captured["warmup"] and (config.max_num_seqs, config.max_num_batched_tokens) == (64, 512)
        assert captured["llm"].engine.async_scheduling  # on by default (auto)
        assert cli.main([*parser_args, "--enforce-eager", "--no-async-scheduling"]) == 0
        assert captured["llm"].engine.config.async_scheduling is False and not captured["llm"].engine.async_scheduling
    finally:
        server.serve_cli = original


def test_failed_warmup_is_a_failed_load():
    """A warm-up that raises is reported like a load failure (serve then exits non-zero)."""
    import httpx

    from gemma4_jax.serving.server import create_app

    class BrokenLLM:
        def warmup(self, max_audio_seconds: float = 30.0):
            raise RuntimeError("no memory for the step")

    errors = []
    app = create_app(BrokenLLM(), warmup=True, on_load_error=errors.append)

    async def check():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
                for _ in range(100):
                    if errors:
                        break
                    await asyncio.sleep(0.05)
                health = await client.get("/health")
        return health

    import asyncio

    health = asyncio.run(check())
    assert errors == ["RuntimeError: no memory for the step"]
    assert health.status_code == 503 and "failed to load" in health.json()["error"]["message"]
