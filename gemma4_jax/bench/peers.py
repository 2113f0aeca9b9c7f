"""`gemma4-jax bench --peers`: our engine against the systems users would run instead, on the same weights.

One run:
1. builds one random checkpoint of `--preset` (default `bench-100m`) with HF transformers, float32, saved in HF
   layout, and the same weights rounded to bfloat16 when `--peer-dtypes` asks for it. The KV-sharing layout is
   the one llama.cpp's Gemma 4 loader accepts (`llama_cpp_kv_layout`), for every system, so all run the SAME
   weights;
2. converts it per peer: the HF directory for ours, HF transformers and vLLM CPU; a GGUF file (f32 or bf16) made
   by `convert_hf_to_gguf.py` from the llama.cpp that llama-cpp-python's source ships, for llama.cpp;
3. starts one runner process per installed system (peer_runners/, each with its own venv's python) which loads
   the model and warms up every batch size, then asks them in turn for the same timed workload, interleaved:
   in each of `--windows` windows, for each batch size, every system runs once (A, B, C, A, B, C, ...). The
   1-minute load average is read before and after every run: the machine may be shared;
4. prints one table per dtype: output tok/s per system (median and range over the windows), peer / ours (ratio
   within each window), load average, greedy agreement with ours, and each system's fraction of the roofline
   (roofline.py: workload FLOPs per second against the best measured GEMM rate; at batch 1 also weight bytes per
   step x steps per second against the measured GEMV read bandwidth). `--json` / `--markdown` save it.

Systems not installed are skipped with the command that installs them (benchmarks/install_peers.sh).
`ours_auto` is ours loaded with `--dtype auto` (model.resolve_dtype: bfloat16 on CPUs that multiply it
natively, float32 on others): it runs only in the session whose checkpoint dtype auto does not compute in, where
it shows what the default dtype makes of that checkpoint. `ours_steps` is ours with the multi-step decode
(`--num-scheduler-steps`, default 4 here; 1 leaves the row out): the engine's default is one step per call.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from gemma4_jax.bench.hf_baseline import agreement, make_hf_checkpoint
from gemma4_jax.bench.presets import bench_preset_dict, random_prompts
from gemma4_jax.bench.roofline import best_gemm_gflops, best_read_gb_s, checkpoint_costs, workload_flops

RUNNERS = Path(__file__).resolve().parent / "peer_runners"
MARKER = "@@peer-runner "  # peer_runners/_protocol.py prefixes its messages with this
DEFAULT_PEERS_DIR = os.environ.get("GEMMA4_JAX_PEERS_DIR", os.path.expanduser("~/.cache/gemma4-jax/peers"))
INSTALL = "benchmarks/install_peers.sh --dir {dir} {peer}"
RUNNER_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class System:
    """One system under test: its runner script, the checkpoint format it reads and where its python lives."""

    name: str
    label: str
    runner: str
    checkpoint: str  # "hf" (the safetensors directory) or "gguf"
    venv: str | None  # folder under the peers dir; None: our own environment


SYSTEMS = {
    s.name: s
    for s in (
        System("ours", "gemma4-jax", "ours.py", "hf", None),
        # What `--dtype auto` (the default of serve/generate/LLM) makes of the checkpoint; run only where auto
        # differs from the checkpoint's dtype.
        System("ours_auto", "gemma4-jax --dtype auto", "ours.py", "hf", None),
        # The multi-step decode (`--num-scheduler-steps`, N decode steps per host round trip when no prefill is
        # pending), in the checkpoint's dtype.
        System("ours_steps", "gemma4-jax --num-scheduler-steps", "ours.py", "hf", None),
        System("hf", "HF transformers generate", "hf.py", "hf", None),
        System("vllm", "vLLM CPU", "vllm_cpu.py", "hf", "vllm"),
        System("llama_cpp", "llama.cpp (llama-cpp-python)", "llama_cpp_runner.py", "gguf", "llama_cpp"),
    )
}


# Decode steps per call of the `ours_steps` row when --num-scheduler-steps is not given (1: no such row).
PEERS_SCHEDULER_STEPS = 4


def llama_cpp_converter(peers_dir: str) -> Path | None:
    """convert_hf_to_gguf.py of the newest llama-cpp-python source that install_peers.sh unpacked, if any."""
    found = sorted(Path(peers_dir, "src").glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[-1] if found else None


def locate(system: System, peers_dir: str) -> tuple[str | None, str]:
    """(python to run the system's runner with, "") or (None, why it is skipped and how to install it)."""
    if system.venv is None:
        missing = [m for m in (("transformers", "torch") if system.name == "hf" else ()) if find_spec(m) is None]
        if missing:
            return None, f"{', '.join(missing)} not installed here: pip install -e '.[test]'"
        return sys.executable, ""
    python = Path(peers_dir, system.venv, "bin", "python")
    hint = INSTALL.format(dir=peers_dir, peer=system.venv)
    if not python.exists():
        return None, f"not installed ({python} missing): {hint}"
    if system.checkpoint == "gguf" and llama_cpp_converter(peers_dir) is None:
        return None, f"llama-cpp-python's source (convert_hf_to_gguf.py) not under {peers_dir}/src: {hint}"
    return str(python), ""


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint, the same for every system


def llama_cpp_kv_layout(layer_types: list[str], num_kv_shared_layers: int) -> list[str]:
    """`layer_types` rearranged so that llama.cpp and HF pick the same KV-source layers, same count of each kind.

    HF: a KV-shared layer reads the cache of the last non-shared layer of its own kind. llama.cpp's Gemma 4 graph
    (llama-model.cpp) hard-codes the last non-shared layer as the full-attention source and the one before it as
    the sliding source. So the last non-shared layer is made a full one (swapped with the last full layer before
    it) and the one before it a sliding one. bench-100m: its full layer 4 moves to index 7.
    """
    types = list(layer_types)
    n = len(types) - num_kv_shared_layers
    if num_kv_shared_layers == 0:
        return types
    if n < 2:
        raise ValueError(f"llama.cpp needs >= 2 non-shared layers before the KV-shared ones, got {n}")
    owners = [i for i in range(n) if types[i] == "full_attention"]
    if not owners or "sliding_attention" not in types[: n - 1]:
        raise ValueError(f"no llama.cpp-compatible KV-sharing layout for layer_types {layer_types}")
    last_full = owners[-1]
    types[last_full], types[n - 1] = types[n - 1], types[last_full]
    if types[n - 2] != "sliding_attention":
        last_sliding = max(i for i in range(n - 1) if types[i] == "sliding_attention")
        types[last_sliding], types[n - 2] = types[n - 2], types[last_sliding]
    return types


def peer_config(preset: str) -> dict[str, Any]:
    """The preset's HF config with the llama.cpp-compatible KV-sharing layout (same shapes and parameter count)."""
    config = bench_preset_dict(preset)
    config["layer_types"] = llama_cpp_kv_layout(config["layer_types"], config.get("num_kv_shared_layers", 0))
    return config


def write_tokenizer(path: str, vocab_size: int) -> None:
    """A synthetic byte-fallback BPE tokenizer of exactly `vocab_size` tokens (tokenizer.json + config).

    The benchmark feeds token ids, so no system tokenizes anything; only the GGUF converter needs a vocabulary
    (Gemma 4's is a byte-fallback BPE) to write the GGUF's token table.
    """
    from tokenizers import Tokenizer, decoders, models

    vocab: dict[str, int] = {}
    for token in ("<pad>", "<eos>", "<bos>", "<unk>", *(f"<unused{i}>" for i in range(12))):
        vocab[token] = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges: list[tuple[str, str]] = []
    frontier = list(letters)
    for letter in letters:
        vocab[letter] = len(vocab)
    while len(vocab) < vocab_size:  # every longer word is its prefix merged with one more letter
        longer = []
        for word in frontier:
            for letter in letters:
                if len(vocab) >= vocab_size:
                    break
                vocab[word + letter] = len(vocab)
                merges.append((word, letter))
                longer.append(word + letter)
        frontier = longer
    if len(vocab) != vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for the synthetic tokenizer (>= {len(vocab)})")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **special}, f)


def build_checkpoints(config: dict[str, Any], workdir: str, seed: int, dtypes: list[str]) -> dict[str, str]:
    """{dtype: HF directory}: random float32 weights from HF, and the same weights rounded to bfloat16."""
    import torch
    from transformers import Gemma4ForCausalLM

    paths = {"float32": os.path.join(workdir, "hf-float32")}
    make_hf_checkpoint(config, paths["float32"], seed)
    write_tokenizer(paths["float32"], config["vocab_size"])
    if "bfloat16" in dtypes:
        paths["bfloat16"] = os.path.join(workdir, "hf-bfloat16")
        model = Gemma4ForCausalLM.from_pretrained(paths["float32"], dtype=torch.float32)
        model.to(torch.bfloat16).save_pretrained(paths["bfloat16"], safe_serialization=True)
        write_tokenizer(paths["bfloat16"], config["vocab_size"])
    return {d: paths[d] for d in dtypes}


def convert_gguf(hf_dir: str, dtype: str, converter: Path, log_path: str) -> str:
    """GGUF file of `hf_dir` written by llama.cpp's own converter (run with our python: it needs torch and a
    transformers that knows Gemma 4; its gguf-py comes from the same llama.cpp tree)."""
    out = f"{hf_dir}.gguf"
    outtype = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    env = {**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")}
    with open(log_path, "w") as log:
        rc = subprocess.run(
            [sys.executable, str(converter), hf_dir, "--outfile", out, "--outtype", outtype],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        ).returncode
    if rc != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {rc}); see {log_path}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Runner processes


class Runner:
    """One system's runner process (peer_runners/_protocol.py): start, wait until warm, run, quit."""

    def __init__(self, system: System, python: str, spec: dict[str, Any], workdir: str, tag: str):
        self.system = system
        spec_path = os.path.join(workdir, f"spec-{system.name}-{tag}.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        self.log_path = os.path.join(workdir, f"log-{system.name}-{tag}.txt")
        env = dict(os.environ)
        if system.venv is not None:
            env.pop("PYTHONPATH", None)  # a peer's venv must not see our packages
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [python, str(RUNNERS / system.runner), spec_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )

    def receive(self, timeout: float = RUNNER_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"{self.system.name}: no answer within {timeout:.0f} s; see {self.log_path}")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.system.name} exited ({self.proc.wait()}):\n{self.log_tail()}")
            if line.startswith(MARKER):
                return json.loads(line[len(MARKER) :])

    def run(self, batch: int, num_prompts: int) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"cmd": "run", "batch": batch, "num_prompts": num_prompts}) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _load() -> float:
    return os.getloadavg()[0]


def measure_machine_subprocess(gemm_size: int, bandwidth_mib: int) -> dict[str, Any]:
    """roofline.measure_machine in a fresh process of our python (no JAX/torch pools left in this one)."""
    out = subprocess.run(
        [sys.executable, "-m", "gemma4_jax.bench.roofline", str(gemm_size), str(bandwidth_mib)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# The interleaved run


def _num_prompts(args: argparse.Namespace, batch: int) -> int:
    """Prompts of a timed run: all of them, or `--batch1-prompts` at batch 1 (one sequence at a time is slow)."""
    return args.num_prompts if batch > 1 else min(args.batch1_prompts, args.num_prompts)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _auto_dtype() -> str:
    """The dtype `--dtype auto` computes in on this platform (model.resolve_dtype)."""
    import numpy as np

    from gemma4_jax.model import resolve_dtype

    return np.dtype(resolve_dtype("auto")).name


def multi_steps(args) -> int:
    """Decode steps per call of the `ours_steps` row: --num-scheduler-steps, else PEERS_SCHEDULER_STEPS."""
    given = getattr(args, "num_scheduler_steps", None)
    return PEERS_SCHEDULER_STEPS if given is None else given


def _start(systems, dtype, checkpoints, ggufs, args, prompts, workdir, session) -> dict[str, Runner]:
    """Start every system's runner for one dtype, one after the other (warm-ups never overlap)."""
    warmup, timed = prompts
    runners = {}
    for name, python in systems.items():
        system = SYSTEMS[name]
        if system.checkpoint == "gguf" and dtype not in ggufs:
            continue
        if name == "ours_auto" and _auto_dtype() == dtype:
            continue  # auto computes in the checkpoint's dtype here: the same run as "ours"
        options: dict[str, Any] = {}
        if name == "ours_steps" and multi_steps(args) <= 1:
            continue  # one step per call: the same run as "ours"
        if name in ("ours", "ours_auto", "ours_steps"):
            options = {
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "attention_backend": args.attention_backend,
            }
            if name == "ours_steps":
                options["num_scheduler_steps"] = multi_steps(args)
        elif name == "vllm":
            options = {"gpu_memory_utilization": args.vllm_gpu_memory_utilization}
        spec = {
            "checkpoint": ggufs[dtype] if system.checkpoint == "gguf" else checkpoints[dtype],
            "dtype": "auto" if name == "ours_auto" else dtype,
            "batch_sizes": args.concurrency,
            "output_len": args.output_len,
            "max_model_len": args.input_len + args.output_len,
            "warmup_prompts": warmup,
            "timed_prompts": timed,
            "threads": os.cpu_count(),
            "options": options,
        }
        print(f"[peers] {dtype}: starting {system.label} (load + warm-up)", file=sys.stderr, flush=True)
        runner = Runner(system, python, spec, workdir, dtype)
        try:
            ready = runner.receive()
        except (RuntimeError, TimeoutError) as e:
            ready = {"ready": False, "error": str(e)}
        if not ready.get("ready"):
            session["failed"][name] = f"{ready.get('error')}\n{runner.log_tail()}"
            print(f"[peers] {system.label} failed to start: {ready.get('error')}", file=sys.stderr, flush=True)
            runner.close()
            continue
        session["systems"][name] = ready["info"]
        runners[name] = runner
    return runners


def _interleave(runners: dict[str, Runner], args: argparse.Namespace, session: dict[str, Any]) -> None:
    """`--windows` windows; in each, every batch size, every system once, in the same order."""
    tokens: dict[tuple[str, int, int], list[list[int]]] = {}
    for window in range(args.windows):
        for batch in args.concurrency:
            for name, runner in runners.items():
                if name in session["failed"]:
                    continue
                load_before = _load()
                try:
                    r = runner.run(batch, _num_prompts(args, batch))
                except (RuntimeError, TimeoutError) as e:
                    session["failed"][name] = str(e)
                    continue
                tokens[name, batch, window] = r.pop("tokens")
                r.update(
                    system=name,
                    batch=batch,
                    window=window,
                    output_tok_s=r["output_tokens"] / r["wall_s"],
                    load_before=load_before,
                    load_after=_load(),
                )
                if ("ours", batch, window) in tokens:
                    r["agreement"] = agreement(tokens["ours", batch, window], tokens[name, batch, window])
                session["runs"].append(r)
                print(
                    f"[peers] window {window} batch {batch} {name}: {r['output_tok_s']:.1f} out tok/s "
                    f"(load {load_before:.2f} -> {r['load_after']:.2f})",
                    file=sys.stderr,
                    flush=True,
                )


def _summarize(session: dict[str, Any], args: argparse.Namespace, gemm: float, read: float,
               dtype: str) -> list[dict[str, Any]]:
    """One row per (batch, system): medians and ranges over the windows, ratios within each window."""
    rows = []
    runs = session["runs"]
    for batch in args.concurrency:
        ours = {r["window"]: r["output_tok_s"] for r in runs if r["system"] == "ours" and r["batch"] == batch}
        for name in session["systems"]:
            mine = [r for r in runs if r["system"] == name and r["batch"] == batch]
            if not mine:
                continue
            tok_s = [r["output_tok_s"] for r in mine]
            ratios = [r["output_tok_s"] / ours[r["window"]] for r in mine if r["window"] in ours]
            flops = session["costs"]["flops_per_prompt"] * _num_prompts(args, batch)
            compute = [flops / r["wall_s"] / (gemm * 1e9) for r in mine]
            # Every step (the prefill one included) reads every weight once and yields one token per sequence;
            # ours_auto holds the checkpoint's weights in auto's dtype: scaled by the itemsizes.
            widen = _itemsize(_auto_dtype()) / _itemsize(dtype) if name == "ours_auto" else 1
            step_bytes = session["costs"]["bytes_per_step"] * widen
            bandwidth = [step_bytes * r["output_tok_s"] / (read * 1e9) for r in mine]
            agreements = [r["agreement"] for r in mine if "agreement" in r]
            rows.append(
                {
                    "batch": batch,
                    "system": name,
                    "version": session["systems"][name].get("version"),
                    "output_tok_s": tok_s,
                    "output_tok_s_median": statistics.median(tok_s),
                    "peer_over_ours": ratios,
                    "load": [min(r["load_before"] for r in mine), max(r["load_after"] for r in mine)],
                    "agreement_min": min(agreements) if agreements else None,
                    "compute_roofline": statistics.median(compute),
                    "bandwidth_roofline": statistics.median(bandwidth) if batch == 1 else None,
                    "compiles_timed": sum(
                        r["extra"].get("compiles", 0) + r["extra"].get("xla_compiles", 0) for r in mine
                    ),
                }
            )
    return rows


def _span(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}-{format(hi, fmt)}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def format_markdown(results: dict[str, Any]) -> str:
    """The tables of a run_peers result (markdown; also what the command prints)."""
    c = results["config"]
    lines = [
        f"{c['preset']} ({c['num_params'] / 1e6:.1f}M params, layer_types {c['layer_types_note']}), "
        f"{c['num_prompts']} prompts x {c['input_len']} tokens -> {c['output_len']} new tokens, greedy "
        f"(batch 1: the first {c['batch1_prompts']} prompts); {c['windows']} interleaved windows; {c['machine']}",
        f"Roofline: GEMM {', '.join(f'{k} {v:.0f}' for k, v in results['roofline']['gemm_gflops'].items())} "
        f"GFLOP/s; read bandwidth {results['roofline']['read_gb_s']:.1f} GB/s (best of the measurements before "
        "and after the runs).",
    ]
    for name, reason in results["skipped"].items():
        lines.append(f"- skipped {SYSTEMS[name].label}: {reason}")
    for dtype, session in results["dtypes"].items():
        costs = session["costs"]
        lines += [
            "",
            f"**{dtype}**: {costs['flops_per_prompt'] / 1e9:.2f} GFLOP per prompt "
            f"({costs['flops_per_prompt'] / c['output_len'] / 1e6:.0f} MFLOP per output token), "
            f"{costs['bytes_per_step'] / 1e6:.0f} MB of weights read per batch-1 step.",
            "",
            "| batch | system | out tok/s (median, range) | peer / ours | load 1m | greedy agreement "
            "| compute roofline | bandwidth roofline |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in session["summary"]:
            version = f" ({row['version']})" if row["version"] else ""
            lines.append(
                f"| {row['batch']} | {SYSTEMS[row['system']].label}{version} | "
                f"{row['output_tok_s_median']:.1f} ({_span(row['output_tok_s'], '.1f')}) | "
                f"{_span(row['peer_over_ours'], '.2f')} | {row['load'][0]:.2f}-{row['load'][1]:.2f} | "
                f"{'-' if row['agreement_min'] is None else format(row['agreement_min'], '.3f')} | "
                f"{_percent(row['compute_roofline'])} | "
                f"{_percent(row['bandwidth_roofline'])} |"
            )
        for name, error in session["failed"].items():
            lines.append(f"- {SYSTEMS[name].label} failed: {error.splitlines()[0] if error else ''}")
    return "\n".join(lines)


def run_peers(args: argparse.Namespace) -> dict[str, Any]:
    """The whole `bench --peers` run (see the module doc); returns the results (also the JSON)."""
    import platform

    wanted = args.peer_systems
    unknown = sorted(set(wanted) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"--peer-systems: unknown {unknown}; known: {sorted(SYSTEMS)}")
    present, skipped = {}, {}
    for name in wanted:
        python, reason = locate(SYSTEMS[name], args.peers_dir)
        if python is None:
            skipped[name] = reason
            print(f"[peers] skipping {SYSTEMS[name].label}: {reason}", file=sys.stderr, flush=True)
        else:
            present[name] = python
    config = peer_config(args.preset or "bench-100m")
    original = bench_preset_dict(args.preset or "bench-100m")["layer_types"]
    moved = [i for i, (a, b) in enumerate(zip(original, config["layer_types"], strict=True)) if a != b]
    tmp = None if args.peers_workdir else tempfile.TemporaryDirectory(prefix="gemma4-peers-")
    workdir = args.peers_workdir or tmp.name
    os.makedirs(workdir, exist_ok=True)
    try:
        print("[peers] measuring the machine (GEMM, GEMV read bandwidth)", file=sys.stderr, flush=True)
        machine = [measure_machine_subprocess(args.gemm_size, args.bandwidth_mib)]
        checkpoints = build_checkpoints(config, workdir, args.seed, args.peer_dtypes)
        ggufs: dict[str, str] = {}
        if "llama_cpp" in present:
            converter = llama_cpp_converter(args.peers_dir)
            for dtype, path in checkpoints.items():
                try:
                    ggufs[dtype] = convert_gguf(path, dtype, converter, os.path.join(workdir, f"convert-{dtype}.txt"))
                except RuntimeError as e:
                    print(f"[peers] {e}", file=sys.stderr, flush=True)
        warmup = random_prompts(args.num_prompts, args.input_len, config["vocab_size"], args.seed + 1)
        timed = random_prompts(args.num_prompts, args.input_len, config["vocab_size"], args.seed)
        sessions = {}
        for dtype, path in checkpoints.items():
            costs = checkpoint_costs(path, config)
            session = {
                "costs": {
                    "flops_per_prompt": workload_flops(costs, config, args.input_len, args.output_len),
                    "bytes_per_step": costs["bytes_per_step"],
                    "num_params": costs["num_params"],
                },
                "systems": {},
                "failed": {},
                "runs": [],
            }
            if "llama_cpp" in present and dtype not in ggufs:
                session["failed"]["llama_cpp"] = f"GGUF conversion failed; see {workdir}/convert-{dtype}.txt"
            runners = _start(present, dtype, checkpoints, ggufs, args, (warmup, timed), workdir, session)
            try:
                _interleave(runners, args, session)
            finally:
                for runner in runners.values():
                    runner.close()
            sessions[dtype] = session
        machine.append(measure_machine_subprocess(args.gemm_size, args.bandwidth_mib))
        gemm = {d: max(best_gemm_gflops(m, d) for m in machine) for d in checkpoints}
        read = max(best_read_gb_s(m) for m in machine)
        for dtype, session in sessions.items():
            session["summary"] = _summarize(session, args, gemm[dtype], read, dtype)
    finally:
        if tmp is not None:
            tmp.cleanup()
    note = "as the preset" if not moved else f"layers {moved} swapped for llama.cpp's KV-sharing layout"
    return {
        "config": {
            "preset": args.preset or "bench-100m",
            "layer_types": config["layer_types"],
            "layer_types_note": note,
            "num_params": next(iter(sessions.values()))["costs"]["num_params"],
            "num_prompts": args.num_prompts,
            "batch1_prompts": _num_prompts(args, 1),
            "input_len": args.input_len,
            "output_len": args.output_len,
            "batch_sizes": args.concurrency,
            "windows": args.windows,
            "seed": args.seed,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
        "skipped": skipped,
        "machine": machine,
        "roofline": {"gemm_gflops": gemm, "read_gb_s": read},
        "dtypes": {d: {k: v for k, v in s.items()} for d, s in sessions.items()},
    }


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """`bench --peers` options (cli.py adds them to `gemma4-jax bench`)."""
    g = parser.add_argument_group("peers: ours against vLLM CPU, llama.cpp and HF on the same weights (--peers)")
    g.add_argument("--peers", action="store_true", help="run the peers benchmark (see docs/benchmarks.md)")
    g.add_argument("--peers-dir", default=DEFAULT_PEERS_DIR, help="the venvs of benchmarks/install_peers.sh")
    g.add_argument("--peer-systems", type=_names, default=list(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    g.add_argument("--peer-dtypes", type=_names, default=None, help="float32,bfloat16 (default: --dtype, float32)")
    g.add_argument("--windows", type=int, default=3, help="interleaved windows (each: every system once)")
    g.add_argument("--batch1-prompts", type=int, default=16, help="prompts of the batch-1 runs (default 16)")
    g.add_argument("--peers-workdir", default=None, help="keep checkpoints, GGUF files and runner logs here")
    g.add_argument("--markdown", default=None, help="write the tables to this markdown file")
    g.add_argument("--gemm-size", type=int, default=2048, help="matrix size of the measured GEMM rate")
    g.add_argument("--bandwidth-mib", type=int, default=256, help="matrix MiB of the measured GEMV bandwidth")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)


def cmd_peers(args: argparse.Namespace) -> int:
    """`gemma4-jax bench --peers`: validate the options, run, print and save."""
    from gemma4_jax.bench.report import json_safe

    for flag, given in (("--model", args.model), ("--hf-baseline", args.hf_baseline), ("--url", args.url)):
        if given:
            raise ValueError(f"{flag} is not supported with --peers (it builds its own checkpoint from --preset)")
    if args.peer_dtypes is None:
        args.peer_dtypes = ["float32" if args.dtype == "auto" else args.dtype]
    if multi_steps(args) < 1:
        raise ValueError(f"--num-scheduler-steps must be >= 1 (the ours_steps row), got {multi_steps(args)}")
    if getattr(args, "num_scheduler_steps", None) is not None and "ours_steps" not in args.peer_systems:
        raise ValueError("--num-scheduler-steps sets the ours_steps row, which --peer-systems leaves out")
    bad = sorted(set(args.peer_dtypes) - {"float32", "bfloat16"})
    if bad:
        raise ValueError(f"--peer-dtypes: {bad} not supported; use float32 and/or bfloat16")
    args.concurrency = args.concurrency or [64, 1]
    for name in ("num_prompts", "input_len", "output_len", "windows", "batch1_prompts"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    results = run_peers(args)
    text = format_markdown(results)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(results), f, indent=2, allow_nan=False)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0
