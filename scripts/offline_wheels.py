"""Download, where the network is, every wheel an offline GPU node needs to install uniter_fast beside its own CUDA
PyTorch and Triton; then install there from that folder alone.

    # here (network): wheels for the node's Python and platform, minus what the node already has
    python scripts/offline_wheels.py --dest wheels --python-version 3.12 --have node-packages.txt
    # on the node (no network), in the repository:
    python3 -m pip install --no-index --find-links wheels -e ".[train,bench]" pytest

``node-packages.txt`` is ``python3 -m pip list --format=freeze`` run on the node (bare package names, one per line,
also work); packages named there are not downloaded. PyTorch, Triton, the NVIDIA CUDA wheels and PyTorch's own
requirements are never downloaded (the node has them: they come with its CUDA PyTorch). DeepSpeed is published only as
a source release, so its wheel is built here (pure Python; its CUDA ops are compiled at run time on the node, and the
project's DeepSpeed configs use ``torch_adam``, which needs none). The build requirements of uniter_fast itself
(setuptools, wheel, pybind11, with what they need) are included, so the C++ extension builds on the node in pip's
isolated build environment. The script prints the folder's size (keep it small: it travels with the repository).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Never downloaded: a CUDA PyTorch node has them (PyTorch, Triton and what ``pip show torch`` requires).
TORCH_STACK = {
    "torch",
    "triton",
    "filelock",
    "typing-extensions",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "fsspec",
    "setuptools",
}
#: Not on PyPI as wheels for the node, or built against its torch: install separately (docs/gpu.md).
NOT_DOWNLOADED = {"flash-attn"}
BUILD_REQUIREMENTS = ["setuptools>=64", "wheel", "pybind11>=2.10"]
EXTRA_TOOLS = ["pytest>=7", "pytest-timeout>=2.1"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def canonical(name: str) -> str:
    """PEP 503 normalised project name ("Py_CPUInfo" -> "py-cpuinfo")."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The project name of a requirement string ("lmdb>=1.4; python_version>'3'" -> "lmdb")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read a project name from requirement {requirement!r}")
    return canonical(match.group(1))


def project_requirements(extras: list[str]) -> list[str]:
    """uniter_fast's dependencies plus those of ``extras``, read from pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            sys.exit("reading pyproject.toml needs Python >= 3.11 or the tomli package (pip install tomli)")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            sys.exit(f"--extras: unknown extra {extra!r}; pyproject.toml defines {sorted(optional)}")
        requirements += optional[extra]
    return requirements


def read_have(path: Optional[str]) -> set[str]:
    """Project names listed in a ``pip list --format=freeze`` / ``pip freeze`` file (or one name per line)."""
    if path is None:
        return set()
    names = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                names.add(requirement_name(line.split("@", 1)[0]))
    return names


def wheel_requirements(path: str) -> list[str]:
    """The unconditional ``Requires-Dist`` entries of a wheel's METADATA."""
    with zipfile.ZipFile(path) as wheel:
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(metadata).decode("utf-8").splitlines()
    entries = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [entry for entry in entries if "extra ==" not in entry]


def pip(*args: str) -> None:
    """Run pip of this interpreter, failing loudly."""
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: Optional[list[str]] = None) -> int:
    """Build the wheel folder; prints its content and size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", required=True, help="folder to fill with wheels")
    parser.add_argument("--python-version", default="3.12", help="the node's Python, e.g. 3.12")
    parser.add_argument("--platform", nargs="+", default=PLATFORMS, help="the node's pip platform tags")
    parser.add_argument("--extras", default="train,bench", help="uniter_fast extras to cover (comma-separated)")
    parser.add_argument("--have", default=None, help="pip freeze of the node: packages it has are not downloaded")
    args = parser.parse_args(argv)
    os.makedirs(args.dest, exist_ok=True)
    skip = TORCH_STACK | NOT_DOWNLOADED | read_have(args.have)
    requirements = project_requirements([e for e in args.extras.split(",") if e])
    requirements += EXTRA_TOOLS

    wanted = [r for r in requirements if requirement_name(r) not in skip]
    deepspeed = [r for r in wanted if requirement_name(r) == "deepspeed"]
    wanted = [r for r in wanted if requirement_name(r) != "deepspeed"]
    if deepspeed:  # sdist only: build its (pure-Python) wheel here, then fetch what it needs
        pip("wheel", "--no-deps", "--wheel-dir", args.dest, deepspeed[0])
        built = [f for f in os.listdir(args.dest) if f.startswith("deepspeed-") and f.endswith(".whl")]
        wanted += [r for r in wheel_requirements(os.path.join(args.dest, built[0])) if requirement_name(r) not in skip]

    target = ["--python-version", args.python_version, "--implementation", "cp", "--only-binary=:all:"]
    for platform in args.platform:
        target += ["--platform", platform]
    # Dependencies resolve against the target; with --have, what the node has is then pruned (pip download cannot
    # know the node's installed set), keeping each remaining project once.
    # pip's isolated build environment sees only the wheel folder, so the build requirements come with all they
    # need, whatever the node has.
    with tempfile.TemporaryDirectory() as build_dir:
        pip("download", "--dest", build_dir, *target, *BUILD_REQUIREMENTS)
        build_projects = {canonical(name.split("-", 1)[0]) for name in os.listdir(build_dir)}
        for name in os.listdir(build_dir):
            shutil.move(os.path.join(build_dir, name), os.path.join(args.dest, name))
    pip("download", "--dest", args.dest, *target, *wanted)
    removed = []
    for name in sorted(os.listdir(args.dest)):
        project = canonical(name.split("-", 1)[0])
        if project in skip and project not in build_projects:
            os.remove(os.path.join(args.dest, name))
            removed.append(name)
    total = 0
    print(f"\nwheels in {args.dest}:")
    for name in sorted(os.listdir(args.dest)):
        size = os.path.getsize(os.path.join(args.dest, name))
        total += size
        print(f"  {size / 2**20:7.2f} MiB  {name}")
    print(f"total {total / 2**20:.1f} MiB ({len(removed)} wheels dropped: the node has them)")
    print(f'on the node: python3 -m pip install --no-index --find-links {args.dest} -e ".[{args.extras}]" pytest')
    return 0


if __name__ == "__main__":
    sys.exit(main())
