"""Package layout only (metadata lives in pyproject.toml).

The repository keeps `kernels/` and `serving/` at its top level, as the design card lays out, but they are
installed under the `gemma4_jax` namespace (`gemma4_jax.kernels`, `gemma4_jax.serving`): `kernels` is already a
package name on PyPI, and bare top-level names would collide with it in users' environments.
"""

from setuptools import find_packages, setup

MAPPED = {"gemma4_jax.kernels": "kernels", "gemma4_jax.serving": "serving"}


def _packages() -> list[str]:
    packages = find_packages(include=["gemma4_jax", "gemma4_jax.*"])
    for namespace, folder in MAPPED.items():
        packages += [namespace] + [f"{namespace}.{p}" for p in find_packages(folder)]
    return packages


# The CPU kernels' C++ sources are compiled on the user's machine at first use (kernels/cpu_build.py).
setup(packages=_packages(), package_dir={"gemma4_jax": "gemma4_jax", **MAPPED},
      package_data={"gemma4_jax.kernels": ["*.h"], "gemma4_jax.kernels.cpu_attention": ["*.cc"],
                    "gemma4_jax.kernels.cpu_matmul": ["*.cc"], "gemma4_jax.kernels.cpu_sampler": ["*.cc"]})
