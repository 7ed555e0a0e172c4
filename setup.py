"""Build script: Python packages plus the optional C++ CPU kernels in csrc/.

The top-level ``kernels/`` folder is installed as the subpackage ``uniter_fast.kernels`` so that the project never
claims the top-level import name ``kernels`` (another PyPI project owns it). Every ``csrc/*.cpp`` file is compiled
into one pybind11 extension, ``uniter_fast._C``; it links against nothing from libtorch (it takes raw buffers), so
it builds in seconds and works with any torch version. Set ``UNITER_FAST_NO_EXT=1`` to skip it: the library then
falls back to its PyTorch paths. A failed build of the extension does not fail the install (``optional=True``).
"""

import glob
import os

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["uniter_fast", "uniter_fast.*"])
PACKAGES += ["uniter_fast.kernels"] + ["uniter_fast.kernels." + p for p in find_packages(where="kernels")]
PACKAGE_DIR = {"uniter_fast": "uniter_fast", "uniter_fast.kernels": "kernels"}


def cpp_extensions() -> list:
    """The pybind11 extension built from csrc/*.cpp, or nothing when there are no sources or it is disabled."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("UNITER_FAST_NO_EXT") == "1":
        return []
    from pybind11.setup_helpers import Pybind11Extension

    compile_args = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if os.environ.get("UNITER_FAST_PORTABLE") != "1":
        compile_args.append("-march=native")
    return [
        Pybind11Extension(
            "uniter_fast._C",
            sources,
            cxx_std=17,
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
            # A machine that cannot build it (no OpenMP, another architecture's compiler flags) still installs the
            # package: setuptools prints the failure and skips the extension, and the reference IPOT path is used.
            optional=True,
        )
    ]


def build_ext_class() -> dict:
    """pybind11's build_ext (parallel-safe flags) when the extension is built."""
    if not cpp_extensions():
        return {}
    from pybind11.setup_helpers import build_ext

    return {"build_ext": build_ext}


setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=cpp_extensions(),
    cmdclass=build_ext_class(),
)
