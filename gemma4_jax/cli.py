"""The `gemma4-jax` command: generate (batch jobs), serve (OpenAI-compatible HTTP), run-batch (OpenAI batch files),
bench (offline throughput/latency), convert (Hugging Face -> sharded orbax checkpoint).

`gemma4-jax generate` with no `--model` runs an embedded tiny model (random weights, byte-level tokenizer), so a
fresh install runs end to end with no download; its output is noise and it says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

DEFAULT_PROMPT = "Hello, Gemma!"
# EngineConfig's defaults for the limits the CLI leaves unset (kept in step with it by tests/test_cli_flags.py).
ENGINE_DEFAULTS = {"max_num_seqs": 64, "max_num_batched_tokens": 512}
# `serve` with the embedded demo model and a warm-up: limits that keep the warm-up to 15 step shapes (rows, chunk
# tokens, context pages and the constrained family multiply: 218 at the defaults; serving/warmup.py). Flags win.
DEMO_SERVE_LIMITS = {"max_num_seqs": 4, "max_model_len": 256, "max_num_batched_tokens": 16}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--logprobs", type=int, default=None)
    g = p.add_argument_group("structured outputs (one at most; per JSONL line: a 'structured_outputs' object)")
    g.add_argument("--json-schema", default=None, help="a JSON schema the output follows: a file or inline JSON")
    g.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    g.add_argument("--regex", default=None, help="a regular expression the whole output matches")
    g.add_argument("--choice", default=None, help="the output is one of these comma-separated strings")
    g.add_argument("--grammar", default=None, help="a Lark or GBNF grammar: a file or inline text")


def _engine_args(p: argparse.ArgumentParser) -> None:
    """Model and engine flags, with vLLM's names and meanings where vLLM has the flag."""
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint directory (vLLM's positional form of --model)")
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny demo model)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--chat-template", default=None, help="a chat template file (jinja) to use instead of the model's")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="auto (default): bfloat16 on GPU and on CPUs with AVX512-BF16/AMX (1.2-1.35x float32's "
                        "tokens/s there), float32 on other CPUs; the demo model is float32")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="tensor (and expert) parallel degree")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="pipeline stages")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1, help="data parallel degree")
    g.add_argument("--quantization", "-q", default=None,
                   help="expected quantization of the checkpoint (modelopt, compressed-tensors, fp8); it is read "
                        "from the checkpoint, and a different one is refused")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"sequences in a batch (default {ENGINE_DEFAULTS['max_num_seqs']}; the demo model under "
                        f"serve: {DEMO_SERVE_LIMITS['max_num_seqs']})")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's, at most 8192; the demo model under serve: "
                        f"{DEMO_SERVE_LIMITS['max_model_len']})")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=f"tokens per step (default {ENGINE_DEFAULTS['max_num_batched_tokens']}; the demo model under "
                        f"serve: {DEMO_SERVE_LIMITS['max_num_batched_tokens']})")
    g.add_argument("--block-size", type=int, default=16, help="KV cache page size in tokens")
    g.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="KV cache pages (full-attention layers), instead of sizing from the memory budget")
    g.add_argument("--kv-cache-memory-gb", type=float, default=4.0,
                   help="KV cache budget in GiB (the CPU's sizing; see --gpu-memory-utilization)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="GPU only: size the KV cache from this fraction of device memory, less the weights")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of cached prompt prefixes in every layer kind (vLLM's flag; on by default; "
                   "--no-enable-prefix-caching turns it off). docs/prefix_caching.md")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap a decode step's host work with the next step on the device (vLLM's flag; on by "
                        "default where it applies: one program, no speculative decoding; --no-async-scheduling "
                        "turns it off). docs/architecture.md")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto"],
                   help="auto: the model dtype (the only one supported)")
    g.add_argument("--attention-backend", default="auto",
                   help="auto (cpu on CPU, xla-rows where its kernel cannot be built; pallas on GPU), xla, "
                        "xla-rows, cpu, pallas, pallas-interpret (both phases)")
    g.add_argument("--prefill-attention-backend", default=None, help="the prefill phase's backend (SGLang's name)")
    g.add_argument("--decode-attention-backend", default=None, help="the decode phase's backend (SGLang's name)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility: Gemma 4 tool calls are always parsed")
    g.add_argument("--tool-call-parser", default=None, choices=["gemma4", "gemma"],
                   help="accepted for vLLM compatibility (Gemma 4's parser is built in)")
    g.add_argument("--compilation-cache-dir", default=None,
                   help="JAX's persistent compilation cache (default: $GEMMA4_JAX_COMPILATION_CACHE or "
                        "~/.cache/gemma4-jax/jax-compilation): a second start loads compiled steps instead")
    g.add_argument("--no-compilation-cache", action="store_true", help="leave the persistent cache off")
    g = p.add_argument_group("speculative decoding (docs/speculative.md)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='vLLM\'s form, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\'')
    g.add_argument("--draft-model", default=None, metavar="DIR", help="the assistant (drafter) checkpoint")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K", help="drafts per step")
    g.add_argument("--enforce-eager", action="store_true",
                   help="serve: skip the start-up warm-up (vLLM's name; here nothing runs eagerly: each step shape "
                        "compiles on the first request that needs it, so /health turns 200 sooner and early "
                        "requests wait on compiles). generate and run-batch never warm up")
    g.add_argument("--no-warmup", action="store_true", help="the same as --enforce-eager")


def _bench_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine flags `bench` honours (it builds its own engines per concurrency)."""
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, help="checkpoint directory (default: a --preset with random weights)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="auto: bfloat16 on GPU and on CPUs with AVX512-BF16/AMX, float32 on other CPUs")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--attention-backend", default="auto")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="automatic prefix caching (on by default; the report shows the hit rate)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap a decode step's host work with the next step on the device (vLLM's flag; on by "
                        "default where it applies: one program, no speculative decoding; --no-async-scheduling "
                        "turns it off). docs/benchmarks.md")


def _model_path(args: argparse.Namespace) -> str | None:
    """--model or the positional MODEL (vLLM accepts both); both and different is an error."""
    if args.model_path is not None and args.model is not None and args.model_path != args.model:
        raise ValueError(f"two models given: positional {args.model_path!r} and --model {args.model!r}")
    return args.model if args.model is not None else args.model_path


def _kv_memory_gb(args: argparse.Namespace) -> float:
    """The KV budget: explicit on CPU; on GPU, from --gpu-memory-utilization of the device's free memory."""
    if args.gpu_memory_utilization is None:
        return args.kv_cache_memory_gb
    import jax

    if not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"--gpu-memory-utilization sizes the KV cache from GPU memory, and this is a "
                         f"{device.platform} device; size it with --kv-cache-memory-gb instead")
    free = stats["bytes_limit"] * args.gpu_memory_utilization - stats.get("bytes_in_use", 0)
    if free <= 0:
        raise ValueError(f"--gpu-memory-utilization {args.gpu_memory_utilization} leaves no memory for the KV "
                         "cache after the weights")
    return free / 2**30


def _sampling_params(args: argparse.Namespace):
    from gemma4_jax.serving.sampling import SamplingParams
    from gemma4_jax.serving.structured import from_cli

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed,
        max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, logprobs=args.logprobs,
        structured_outputs=from_cli(args.json_schema, args.json_object, args.regex, args.choice, args.grammar),
    )


def _job_params(params, job: dict[str, Any], where: str):
    """A JSONL line's own 'structured_outputs' (vLLM's fields: json, regex, choice, grammar, ...) over the flags."""
    import dataclasses

    from gemma4_jax.serving.structured import StructuredOutputs, check_grammar

    if job.get("structured_outputs") is None:
        return params
    try:
        spec = StructuredOutputs.from_value(job["structured_outputs"])
        check_grammar(spec)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return dataclasses.replace(params, structured_outputs=spec)


def build_llm(args: argparse.Namespace):
    import gemma4_jax
    from gemma4_jax.serving.demo import demo_model

    model_path = _model_path(args)
    limits = {name: getattr(args, name) for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens")}
    if model_path is None and getattr(args, "command", None) == "serve" and not (args.enforce_eager or args.no_warmup):
        limits = {name: DEMO_SERVE_LIMITS[name] if value is None else value for name, value in limits.items()}
        logging.getLogger(__name__).info("demo model: serving with max_num_seqs %d, max_model_len %d, "
                                         "max_num_batched_tokens %d so the warm-up stays short (flags change them)",
                                         *limits.values())
    limits = {name: ENGINE_DEFAULTS.get(name) if value is None else value for name, value in limits.items()}
    options = dict(**limits, attention_backend=args.attention_backend,
                   prefill_backend=args.prefill_attention_backend, decode_backend=args.decode_attention_backend,
                   page_size=args.block_size, compilation_cache=False if args.no_compilation_cache
                   else args.compilation_cache_dir, enable_prefix_caching=args.enable_prefix_caching,
                   async_scheduling=args.async_scheduling)
    if args.num_gpu_blocks_override is not None:
        options["num_pages"] = args.num_gpu_blocks_override + 1  # plus the trash page
    if args.speculative_config or args.draft_model or args.num_speculative_tokens:
        from gemma4_jax.serving.speculative import SpeculativeConfig

        try:
            spec = json.loads(args.speculative_config) if args.speculative_config else None
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config is not valid JSON: {e}") from None
        if spec is not None and not isinstance(spec, dict):
            raise ValueError("--speculative-config must be a JSON object")
        options["speculative_config"] = SpeculativeConfig.resolve(spec, args.draft_model, args.num_speculative_tokens)
    tokenizer = None
    if args.tokenizer is not None or args.chat_template is not None:
        from gemma4_jax.serving.tokenizer import Tokenizer

        source = args.tokenizer or model_path
        if source is None:
            raise ValueError("--chat-template needs a checkpoint or --tokenizer (the demo model has its own)")
        tokenizer = Tokenizer.from_dir(source)
        if args.chat_template is not None:
            with open(args.chat_template) as f:
                tokenizer.chat_template = f.read()
    if model_path is None:
        if args.tensor_parallel_size * args.pipeline_parallel_size * args.data_parallel_size > 1:
            raise ValueError("the embedded demo model runs on one device; give a checkpoint to shard")
        model, demo_tokenizer = demo_model()
        print("note: no --model given: running the embedded tiny demo model (random weights, byte-level "
              "tokenizer); its output is meaningless text.", file=sys.stderr)
        return gemma4_jax.LLM(model, tokenizer=tokenizer or demo_tokenizer, **options)
    if args.quantization is not None:
        _check_quantization(model_path, args.quantization)
    options["kv_memory_gb"] = _kv_memory_gb(args)
    return gemma4_jax.LLM(model_path, dtype=args.dtype, tp=args.tensor_parallel_size,
                          pp=args.pipeline_parallel_size, dp=args.data_parallel_size, tokenizer=tokenizer, **options)


def _check_quantization(path: str, expected: str) -> None:
    """--quantization names what the checkpoint must hold; we read the format from its files, so a mismatch is an
    error rather than a silent override."""
    from gemma4_jax.quant_formats import read_quant_config

    found = read_quant_config(path)
    method = None if found is None else found.method
    aliases = {"modelopt": {"modelopt"}, "modelopt_fp4": {"modelopt"}, "nvfp4": {"modelopt", "compressed-tensors"},
               "compressed-tensors": {"compressed-tensors"}, "fp8": {"modelopt", "compressed-tensors"},
               "none": {None}}
    wanted = aliases.get(expected.lower())
    if wanted is None:
        raise ValueError(f"--quantization {expected!r} is not supported; supported: {sorted(aliases)}")
    if method not in wanted:
        raise ValueError(f"--quantization {expected!r}, but {path} is "
                         f"{'not quantized' if method is None else 'quantized with ' + method}")


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    jobs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{n}: not valid JSON ({e})") from None
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict) or not ({"prompt", "messages"} & set(item)):
                raise SystemExit(f"error: {path}:{n}: expected a string or an object with 'prompt' or 'messages'")
            jobs.append(item)
    return jobs


def cmd_generate(args: argparse.Namespace) -> int:
    # What was chosen (model, dtype, devices, backends, KV budget) and compile progress go to stderr at INFO;
    # --quiet keeps warnings only.
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    params = _sampling_params(args)
    if args.input:
        jobs = _read_jsonl(args.input)
    else:
        jobs = [{"prompt": p} for p in (args.prompt or [DEFAULT_PROMPT])]
    per_job = {id(j): _job_params(params, j, f"{args.input}: record {k + 1}") for k, j in enumerate(jobs)}
    llm = build_llm(args)
    chats = [j for j in jobs if "messages" in j or args.chat]
    plain = [j for j in jobs if not ("messages" in j or args.chat)]
    results: dict[int, Any] = {}
    if plain:
        outs = llm.generate([j["prompt"] for j in plain], [per_job[id(j)] for j in plain], use_tqdm=not args.quiet)
        for j, o in zip(plain, outs):
            results[id(j)] = o
    if chats:
        convs = [j.get("messages") or [{"role": "user", "content": j["prompt"]}] for j in chats]
        outs = llm.chat(convs, [per_job[id(j)] for j in chats], use_tqdm=not args.quiet)
        for j, o in zip(chats, outs):
            results[id(j)] = o
    sink = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115
    try:
        for j in jobs:
            o = results[id(j)]
            if args.output or args.input:
                record = {**j, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                sink.write(f"--- prompt: {j.get('prompt')!r}\n{o.text}\n[{len(o.token_ids)} tokens, "
                           f"finish_reason={o.finish_reason}]\n")
    finally:
        if sink is not sys.stdout:
            sink.close()
    stats = llm.engine.stats
    print(f"done: {len(jobs)} request(s), {stats['generated_tokens']} generated tokens, {stats['compiles']} "
          f"compilations ({stats['compile_time_s']:.1f} s)", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gemma4_jax.serving.server import serve_cli

    return serve_cli(args, build_llm)


def _serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)")
    _engine_args(srv)
    g = srv.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (also $GEMMA4_JAX_API_KEY); "
                   "an empty key is refused")
    g.add_argument("--allowed-hosts", action="append", default=None,
                   help="Host header names to answer (comma-separated, repeatable; '*' any, '*.example.com' a "
                   "domain). Default: localhost, 127.0.0.1, ::1 and --host, or any when --host is 0.0.0.0 / ::")
    g.add_argument("--served-model-name", default=None, help="the model id clients send (default: the dir name)")
    g.add_argument("--max-queue", type=int, default=256, help="unfinished requests beyond --max-num-seqs before 429")
    g.add_argument("--max-queued-tokens", type=int, default=None,
                   help="cap on prompt + max_tokens summed over unfinished requests (429 beyond)")
    g.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="413 beyond this request body size")
    g.add_argument("--max-n", type=int, default=16, help="largest n (choices per request)")
    g.add_argument("--cors-origin", action="append", default=None, help="allowed CORS origin (repeatable; off)")
    g.add_argument("--grace-period", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    g.add_argument("--max-tokenize-tokens", type=int, default=131072, help="most tokens /tokenize answers with")
    g.add_argument("--allow-special-tokens-in-chat", action="store_true",
                   help="read special-token strings in chat messages as control tokens (default: plain text)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection gets to send its request line and headers")
    g.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request gets to send its body (408)")
    g.add_argument("--timeout-keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection lives")
    g.add_argument("--h11-max-incomplete-event-size", type=int, default=16 * 1024,
                   help="most bytes of request line and headers (400 beyond)")
    g.add_argument("--reasoning-parser", default=None, choices=["gemma4"],
                   help="split Gemma 4's thought channel into reasoning_content; structured outputs and forced "
                   "tool calls then bind the answer after the thinking (vLLM's name)")
    g.add_argument("--log-level", default="info")
    srv.set_defaults(func=cmd_serve)


def cmd_run_batch(args: argparse.Namespace) -> int:
    from gemma4_jax.serving.batch_file import run_batch

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not os.path.isfile(args.input_file):
        raise FileNotFoundError(f"--input-file {args.input_file} is not a file")
    llm = build_llm(args)
    summary = run_batch(llm, args.input_file, args.output_file, served_model_name=args.served_model_name,
                        max_concurrency=args.max_concurrency, progress=not args.quiet)
    print(f"done: {summary.ran} line(s) run ({summary.failed} with an error), {summary.skipped} already in "
          f"{args.output_file}; {llm.engine.stats['compiles']} compilations", file=sys.stderr)
    return 0


def _run_batch_parser(sub) -> None:
    rb = sub.add_parser("run-batch", help="run an OpenAI batch file (JSONL of /v1/chat/completions and "
                        "/v1/completions requests) offline, as vllm run-batch")
    rb.add_argument("-i", "--input-file", required=True, help="JSONL: {custom_id, method, url, body} per line")
    rb.add_argument("-o", "--output-file", required=True,
                    help="JSONL results, appended as they finish; custom_ids already there are skipped (resume)")
    rb.add_argument("--served-model-name", default=None,
                    help="the model name lines must give (default: the one the first line gives)")
    rb.add_argument("--max-concurrency", type=int, default=None, help="lines in flight (default 4 x max-num-seqs)")
    rb.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    _engine_args(rb)
    rb.set_defaults(func=cmd_run_batch)


def cmd_convert(args: argparse.Namespace) -> int:
    from gemma4_jax.convert import convert

    convert(args.model, args.output, dtype=args.dtype, pp=args.pp, tp=args.tp, overwrite=args.overwrite)
    return 0


def _convert_parser(sub) -> None:
    conv = sub.add_parser("convert", help="convert a Hugging Face checkpoint to a sharded orbax checkpoint "
                          "(docs/convert.md)")
    conv.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    conv.add_argument("--output", required=True, help="directory to write (must be new or empty)")
    conv.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                      help="parameter dtype to store (packed quantized weights keep theirs)")
    conv.add_argument("--pp", type=int, default=1, help="pipeline stages to load with (memory only; any layout "
                      "can load the result)")
    conv.add_argument("--tp", type=int, default=1, help="tensor parallel degree to load with")
    conv.add_argument("--overwrite", action="store_true", help="replace a previous conversion at --output")
    conv.set_defaults(func=cmd_convert)


def main(argv: list[str] | None = None) -> int:
    from gemma4_jax.version import __version__

    parser = argparse.ArgumentParser(prog="gemma4-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gemma4-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for prompts (a batch job with --input/--output)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--input", help="JSONL of prompts: strings or objects with 'prompt' or 'messages'")
    gen.add_argument("--output", help="write JSONL results here (default: stdout)")
    gen.add_argument("--chat", action="store_true", help="wrap plain prompts in the chat template")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _engine_args(gen)
    _sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    _serve_parser(sub)
    _run_batch_parser(sub)
    _convert_parser(sub)
    try:
        from gemma4_jax.bench.cli import add_parser as add_bench_parser

        add_bench_parser(sub, _bench_engine_args)
    except ImportError:
        pass
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top-level one
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if getattr(args, "model_path", None) is not None:
            args.model = _model_path(args)
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
