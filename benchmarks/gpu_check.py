"""The prepared device check (issue 12), in one run: the GPU-only tests (the compiled kernels against their
references), then the attention backends side by side (benchmarks/attention_kernels.py), written as one JSON
and one markdown table under --out.

--reduced runs the same steps on a CPU (the GPU tests skip, the kernels run in interpret mode on tiny shapes), so
that the script is known to work before a GPU is available. Whole-model figures (decode tok/s per preset, TTFT)
are not part of it yet.

Usage: python benchmarks/gpu_check.py [--reduced] [--out DIR] [--test-timeout 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import attention_kernels  # noqa: E402 (the benchmark beside this file)


def run_gpu_tests(timeout: int) -> dict:
    """pytest -k gpu over the kernel folders: {"returncode", "seconds", "summary"}."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rs",
        "-k",
        "gpu",
        os.path.join(ROOT, "kernels"),
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else str(e)
    tail = out.strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    return {"returncode": code, "seconds": time.perf_counter() - t0, "summary": tail}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true", help="CPU: GPU tests skip, kernels in interpret mode")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "gpu_check_out"))
    ap.add_argument("--test-timeout", type=int, default=300)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tests = run_gpu_tests(args.test_timeout)
    bench = attention_kernels.main(["--reduced"] if args.reduced else [])
    result = {"tests": tests, "attention": bench}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = attention_kernels.markdown(bench)
    status = tests["returncode"]
    md = (
        f"# Device check\n\nGPU tests (`pytest -k gpu kernels/`): exit {status}, {tests['seconds']:.0f} s\n\n"
        f"## Attention: pallas vs xla, one layer\n\n{table}"
    )
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md)
    print(md)
    return 0 if status in (0, 5) else 1  # 5: no test collected/selected


if __name__ == "__main__":
    sys.exit(main())
