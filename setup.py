"""The compiled part of sftdiff: create's scan (sftdiff/_kernels.c; everything else is in pyproject.toml).

Optional: where it cannot be built (no C compiler), the install goes on without it and `create`
scans with numpy, with byte-identical output, several times slower (sftdiff/kernels.py)."""

import os

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "sftdiff._kernels", ["sftdiff/_kernels.c"], optional=os.environ.get("SFTDIFF_REQUIRE_COMPILED") != "1",
    # -O3 vectorizes the per-value loop; no -ffast-math: the output must match numpy bit for bit.
    extra_compile_args=["/O2"] if os.name == "nt" else ["-O3"],
)])
