"""The prepared device check (issue 12), in one run under a deadline, writing one JSON and one markdown table.

Each section runs in its own process with a time limit cut to what is left of `--deadline`, and whatever finished
is reported even if a later section fails or is skipped. They run in the order `--sections` gives (default:
machine, tests, models, attention, fp4, stack):

1. `machine`: devices, versions, the measured copy bandwidth and bf16 matmul rate (the rooflines' ceilings);
2. `tests`: the GPU-marked kernel tests (`pytest -k gpu kernels/`: the compiled kernels against their references);
3. `stack`: every module imports (server included), the CLI's `generate` on the embedded demo model gives the
   same greedy text with the `pallas` attention backend as with `xla`, and `serve` answers a /v1/completions
   request with each (the same text);
4. `attention`: one layer's attention, kernel vs `xla`, decode and prefill (benchmarks/attention_kernels.py);
5. `fp4`: the NVFP4 grouped expert kernel vs the XLA path at 26B-A4B shapes, with a tile sweep
   (benchmarks/fp4_experts.py);
6. `models`: whole presets with random weights (benchmarks/gpu_models.py): decode tok/s at batch 1, 8, 64, TTFT at
   1k and 8k prompts, each beside its roofline, for the jobs in `--jobs` (preset:experts:attention), kernel and
   `xla` side by side; compile time separate.

--reduced runs every section on a CPU (GPU tests skip, kernels in interpret mode, tiny shapes), so that the script
is known to work before a GPU is available.

Usage: python benchmarks/gpu_check.py [--reduced] [--out DIR] [--deadline 450] [--jobs e4b:bf16:pallas+xla,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The kernel tests: kernels/ in the repository, gemma4_jax/kernels/ in the laid-out copy gpu_check.sh runs.
KERNELS = "kernels" if os.path.isdir(os.path.join(ROOT, "kernels")) else os.path.join("gemma4_jax", "kernels")

# preset:experts:attention variants (+ separates variants run on the same weights in one process; "row1" adds the
# variant of batch-1 decode with one-row products treated the other way from the platform's default: unpadded on a
# GPU). Ordered by what the issue asks first.
DEFAULT_JOBS = "e4b:bf16:pallas+xla+row1,26b-a4b:nvfp4:pallas+xla,31b:bf16:pallas+xla,26b-a4b:bf16:pallas+xla"
MACHINE = r"""
import json, subprocess, time, jax, jax.numpy as jnp
out = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
try:
    out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,"
        "clocks.mem", "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:
    out["nvidia_smi"] = repr(e)
def bench(f, *a, n=10):
    jax.block_until_ready(f(*a)); jax.block_until_ready(f(*a))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]
gpu = jax.default_backend() == "gpu"
n = (1 << 30) if gpu else (1 << 24)  # bf16 elements: 2 GiB on a GPU
x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
t = bench(jax.jit(lambda x: x * 1.5 + 1.0), x)  # one read + one write
out["copy_gbps"] = 2 * x.nbytes / t / 1e9
m = 8192 if gpu else 512
a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
b = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
t = bench(jax.jit(lambda a, b: a @ b), a, b)
out["matmul_tflops"] = 2 * m ** 3 / t / 1e12
print("MACHINE " + json.dumps(out))
"""
STACK = r"""
import importlib, json, pkgutil, sys
import gemma4_jax
failed = {}
count = 0
for mod in pkgutil.walk_packages(gemma4_jax.__path__, "gemma4_jax."):
    if ".test" in mod.name or mod.name.endswith("conftest"):
        continue
    try:
        importlib.import_module(mod.name); count += 1
    except Exception as e:
        failed[mod.name] = f"{type(e).__name__}: {e}"[:300]
print("STACK " + json.dumps({"imported": count, "failed": failed}))
"""

SERVER = r"""
import json, os, signal, socket, subprocess, sys, time, urllib.request
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
backend = sys.argv[1]
proc = subprocess.Popen([sys.executable, "-m", "gemma4_jax.cli", "serve", "--no-warmup", "--port", str(port),
                         "--dtype", "float32", "--attention-backend", backend], stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
base = f"http://127.0.0.1:{port}"
out = {"backend": backend}
try:
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except Exception:
            time.sleep(0.5)
    out["ready_s"] = round(time.time() - t0, 1)
    body = json.dumps({"model": json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"],
                       "prompt": "The weather today is", "max_tokens": 24, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out["status"] = r.status
        out["text"] = json.load(r)["choices"][0]["text"]
except Exception as e:
    out["error"] = repr(e)
finally:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    if "error" in out:
        out["server_log_tail"] = (proc.stderr.read() or "")[-1500:]
print("SERVER " + json.dumps(out))
"""


def _env(reduced: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not reduced:
        env["JAX_PLATFORMS"] = "cuda"  # the test conftest defaults to cpu
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    else:
        env["JAX_PLATFORMS"] = "cpu"
        env["GEMMA4_JAX_PALLAS_INTERPRET"] = "1"
    env.setdefault("GEMMA4_JAX_COMPILATION_CACHE", "off")
    return env


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run(cmd: list[str], limit: float, env: dict, log) -> dict:
    """Run cmd with a time limit; its output goes to the log and the last lines into the result."""
    t0 = time.perf_counter()
    if limit < 5:
        return {"skipped": f"no time left ({limit:.0f} s)"}
    log.write(f"\n$ {' '.join(cmd)}  (limit {limit:.0f} s)\n")
    log.flush()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        code, out, stdout = proc.returncode, proc.stdout + proc.stderr, proc.stdout
    except subprocess.TimeoutExpired as e:
        raw = (e.stdout or b"") + (e.stderr or b"")
        code, out = "timeout", raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        stdout = ""
    log.write(out)
    log.flush()
    tail = out.strip().splitlines()[-25:]
    print(f"--- {' '.join(cmd[:4])}... exit {code} in {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n".join(tail[-12:]), flush=True)
    return {"returncode": code, "seconds": round(time.perf_counter() - t0, 1), "tail": tail, "output": out,
            "stdout": stdout}


def _marked(output: str, marker: str):
    for line in output.splitlines():
        if line.startswith(marker + " "):
            return json.loads(line[len(marker) + 1 :])
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true", help="CPU: GPU tests skip, kernels in interpret mode")
    ap.add_argument("--repo", default=ROOT, help="the repository (gpu_check.sh runs a laid-out copy of it)")
    ap.add_argument("--out", default=None, help="default: $OUT, else REPO/benchmarks/gpu_check_out")
    ap.add_argument("--deadline", type=float, default=450.0, help="seconds for the whole check")
    ap.add_argument("--jobs", default=DEFAULT_JOBS,
                    help="model jobs preset:experts:attention[+attention...][+row1], comma-separated")
    ap.add_argument("--sections", default="machine,tests,models,attention,fp4,stack",
                    help="sections to run, in this order")
    ap.add_argument("--model-job-seconds", type=float, default=240.0, help="limit of one model job")
    ap.add_argument("--model-xla-flags", default="--xla_gpu_enable_triton_gemm=false",
                    help="XLA_FLAGS of the model jobs (default: cuBLAS GEMMs, no Triton GEMM autotuning, which "
                    "multiplies compile time on real-size presets)")
    ap.add_argument("--profile-batches", default="1,8", help="decode batch sizes the model jobs profile (kernels by "
                    "time, in models.jsonl) and whose optimized HLO they save (hlo.tgz); empty: none")
    args = ap.parse_args(argv)
    args.out = args.out or os.environ.get("OUT") or os.path.join(args.repo, "benchmarks", "gpu_check_out")
    deadline = Deadline(args.deadline)
    os.makedirs(args.out, exist_ok=True)
    env = _env(args.reduced)
    py = sys.executable
    result: dict = {"reduced": args.reduced, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    log = open(os.path.join(args.out, "gpu_check.log"), "w")
    models_path = os.path.join(args.out, "models.jsonl")
    fp4_path = os.path.join(args.out, "fp4.jsonl")
    for p in (models_path, fp4_path):
        if os.path.exists(p):
            os.remove(p)

    def save():
        slim = {k: ({kk: vv for kk, vv in v.items() if kk not in ("output", "stdout")} if isinstance(v, dict) else v)
                for k, v in result.items()}
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(slim, f, indent=1, default=str)
        with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
            f.write(markdown(result, models_path))

    machine: dict = {}

    def sec_machine():
        r = run([py, "-c", MACHINE], min(90, deadline.left()), env, log)
        machine.update(_marked(r.get("output", ""), "MACHINE") or {})
        result["machine"] = {**r, **machine}

    def sec_tests():
        result["tests"] = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k", "gpu", KERNELS],
                              min(150, deadline.left() - 30), env, log)

    def sec_stack():
        r = run([py, "-c", STACK], min(60, deadline.left() - 30), env, log)
        stack = {"imports": _marked(r.get("output", ""), "STACK"), "import_returncode": r.get("returncode")}
        texts = {}
        for backend in ("xla", "pallas"):
            cmd = [py, "-m", "gemma4_jax.cli", "generate", "--prompt", "The weather today is", "--max-tokens", "24",
                   "--temperature", "0", "--no-warmup", "--dtype", "float32", "--attention-backend", backend]
            g = run(cmd, min(90, deadline.left() - 30), env, log)
            texts[backend] = {"returncode": g.get("returncode"), "seconds": g.get("seconds"),
                              "text": g.get("stdout", "").strip()}
        stack["generate"] = texts
        stack["same_text"] = texts["xla"]["returncode"] == 0 and texts["xla"]["text"] == texts["pallas"]["text"]
        served = {}
        for backend in ("xla", "pallas"):  # the OpenAI server on the same model: one completion each
            r = run([py, "-c", SERVER, backend], min(150, deadline.left() - 20), env, log)
            served[backend] = _marked(r.get("output", ""), "SERVER") or {"returncode": r.get("returncode")}
        stack["server"] = served
        stack["server_same_text"] = bool(served["xla"].get("text")) and (
            served["xla"].get("text") == served["pallas"].get("text"))
        result["stack"] = stack

    def sec_attention():
        cmd = [py, os.path.join(HERE, "attention_kernels.py"), "--out", os.path.join(args.out, "attention.json")]
        result["attention"] = run(cmd + (["--reduced"] if args.reduced else []), min(120, deadline.left() - 30),
                                  env, log)

    def sec_fp4():
        cmd = [py, os.path.join(HERE, "fp4_experts.py"), "--json", fp4_path]
        if machine.get("copy_gbps"):
            cmd += ["--copy-gbps", f"{machine['copy_gbps']:.1f}"]
        result["fp4"] = run(cmd + (["--reduced"] if args.reduced else []), min(100, deadline.left() - 30), env, log)

    hlo_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "gpu_check_hlo")
    shutil.rmtree(hlo_dir, ignore_errors=True)

    def sec_models():
        result["models"] = {}
        for job in [j for j in args.jobs.split(",") if j]:
            preset, experts, attention = job.split(":")
            names = attention.split("+")
            flip = "row1" in names
            names = [n for n in names if n != "row1"]
            cmd = [py, os.path.join(HERE, "gpu_models.py"), "--preset", preset, "--experts", experts,
                   "--attention", ",".join(names), "--moe-backend", "auto", "--json", models_path]
            if flip:
                cmd.append("--one-row-variant")
            if args.profile_batches:
                cmd += ["--profile-batches", args.profile_batches, "--hlo-dir", hlo_dir]
            if preset.startswith("26b"):
                cmd += ["--workload", "1000,250"]
            if machine.get("copy_gbps"):
                cmd += ["--copy-gbps", f"{machine['copy_gbps']:.1f}"]
            if machine.get("matmul_tflops"):
                cmd += ["--matmul-tflops", f"{machine['matmul_tflops']:.1f}"]
            if args.reduced:
                cmd.append("--reduced")
            limit = min(args.model_job_seconds, deadline.left() - 10)
            if limit < 45:
                result["models"][job] = {"skipped": f"{limit:.0f} s left"}
                continue
            job_env = dict(env)
            if not args.reduced and args.model_xla_flags:
                job_env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.model_xla_flags).strip()
            result["models"][job] = run(cmd, limit, job_env, log)
            save()
        if os.path.isdir(hlo_dir):  # one file back (the device tool returns few), compressed
            with tarfile.open(os.path.join(args.out, "hlo.tgz"), "w:gz") as tar:
                tar.add(hlo_dir, arcname="hlo")

    known = {"machine": sec_machine, "tests": sec_tests, "stack": sec_stack, "attention": sec_attention,
             "fp4": sec_fp4, "models": sec_models}
    for name in args.sections.split(","):
        if name not in known:
            raise SystemExit(f"unknown section {name!r}; known: {list(known)}")
    for name in args.sections.split(","):
        known[name]()
        save()
    result["seconds"] = round(args.deadline - deadline.left(), 1)
    save()
    print(markdown(result, models_path))
    log.close()
    ok = result.get("tests", {}).get("returncode", 0) in (0, 5)
    return 0 if ok else 1


def markdown(result: dict, models_path: str) -> str:
    m = result.get("machine", {})
    lines = ["# Device check", ""]
    if m:
        lines += [f"Machine: {m.get('nvidia_smi', m.get('devices'))}; JAX {m.get('jax')} ({m.get('backend')}); "
                  f"measured copy {m.get('copy_gbps', 0):.0f} GB/s, bf16 matmul {m.get('matmul_tflops', 0):.0f} "
                  "TFLOP/s", ""]
    t = result.get("tests")
    if t:
        lines += [f"GPU tests (`pytest -k gpu kernels/`): exit {t.get('returncode')}, {t.get('seconds')} s: "
                  f"{(t.get('tail') or [''])[-1]}", ""]
    s = result.get("stack")
    if s:
        imp = s.get("imports") or {}
        served = s.get("server") or {}
        lines += [f"Stack: {imp.get('imported')} modules imported, failed: {imp.get('failed') or 'none'}; "
                  f"`generate` pallas == xla text: {s.get('same_text')}; `serve` /v1/completions status "
                  f"{[served.get(b, {}).get('status') for b in ('xla', 'pallas')]}, pallas == xla text: "
                  f"{s.get('server_same_text')}", ""]
    a = result.get("attention")
    if a:
        lines += ["## Attention, one layer", "", *[x for x in (a.get("tail") or []) if x.startswith("|")], ""]
    f4 = result.get("fp4")
    if f4:
        lines += ["## NVFP4 experts (26B-A4B shapes)", "", *[x for x in (f4.get("tail") or []) if x.startswith("|")],
                  ""]
    rows = []
    if os.path.exists(models_path):
        with open(models_path) as f:
            rows = [json.loads(x) for x in f if x.strip()]
    if rows:
        lines += ["## Whole models, random weights, bf16", "",
                  "| preset | experts | attention | batch | ms/step | tok/s | x roofline | TTFT 1k ms | TTFT 8k ms | "
                  "compile s (wall) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            pre = r.get("prefill", {})
            ttft = [f"{pre[k]['ttft_ms']:.1f}" if k in pre else "-" for k in ("1024", "8192")]
            for b, d in sorted(r.get("decode", {}).items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {r['preset']} | {r['experts']} | {r['attention']} | {b} | {d['step_ms']:.2f} | "
                             f"{d['tok_s']:.0f} | {d.get('x_roofline', float('nan')):.2f} | {ttft[0]} | {ttft[1]} | "
                             f"{r['compile'].get('wall_s', r['compile'].get('wall_s_all_variants', 0)):.0f} |")
            if r.get("workload"):
                w = r["workload"]
                lines.append(f"| {r['preset']} | {r['experts']} | {r['attention']} | workload {w['prompt']}->"
                             f"{w['output']} c=1 | | **{w['output_tok_s']:.0f} out tok/s** | | | | |")
            if r.get("errors"):
                lines.append(f"| {r['preset']} | {r['experts']} | {r['attention']} | errors: "
                             f"{', '.join(r['errors'])} | | | | | | |")
    for r in rows:  # the profiled decode steps: the device's time by trace line and its largest kernels
        for key, prof in (r.get("profile") or {}).items():
            lines += ["", f"Profile {r['preset']}/{r['experts']}/{r['attention']} {key}: span "
                      f"{prof.get('span_ms', 0):.2f} ms/step, lines {prof.get('lines_ms') or prof.get('error')}"]
            lines += [f"- {ms:.3f} ms x{count:g}: {name[:160]}" for name, ms, count in (prof.get("top") or [])[:12]]
    models = result.get("models", {})
    bad = {j: (v.get("skipped") or f"exit {v.get('returncode')}") for j, v in models.items()
           if v.get("skipped") or v.get("returncode") not in (0, None)}
    if bad:
        lines += ["", f"Model jobs not complete: {bad}"]
    lines += ["", f"Total {result.get('seconds')} s"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
