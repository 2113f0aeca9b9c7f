"""Test setup for every test folder (tests/ and the kernel folders): a simulated 8-device CPU mesh, set before jax
is imported anywhere, so sharded and pipelined tests see 8 devices whichever folder is collected first."""

import gc
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile into memory only: no writes to the user's persistent compilation cache, and no shared cache files
# between concurrent test processes (tests/test_startup.py turns it on explicitly in a temporary directory).
os.environ.setdefault("GEMMA4_JAX_COMPILATION_CACHE", "off")
# One process runs the whole suite: malloc keeps returning freed memory to the kernel there (serving/host_memory.py
# is on in engines by default; tests/test_engine.py checks it in a process of its own).
os.environ.setdefault("GEMMA4_JAX_KEEP_FREED_MEMORY", "0")
# Nor are the engines' weights collapsed onto huge pages on a thread of their own (tests/test_host_memory.py and
# tests/test_engine.py's host-memory test turn it on).
os.environ.setdefault("GEMMA4_JAX_HUGE_PAGE_WEIGHTS", "0")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# The suite's tiny models run in microseconds while XLA's LLVM backend spends most of every compile optimising
# them, and compiling is most of what the suite does on a CPU: without the backend's optimisations a module of
# engine tests runs ~1.5x faster (tests/test_attention_backends.py 88 s -> 60 s). Only LLVM's code generation
# changes; the HLO passes, and so the numerics every test compares, stay. Benchmarks and users keep the default.
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module (its own fixtures torn down first), drop JAX's caches of compiled programs.

    XLA:CPU maps every compiled program's code into memory as several separate mappings that live as long as the
    program; one process running the whole suite compiles thousands of programs and ran into the kernel's limit
    of 65,530 mappings per process (vm.max_map_count), which aborts inside the compiler (CI died that way after
    ~300 tests). Programs that a later module needs are simply compiled again."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
