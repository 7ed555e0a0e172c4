"""Docs, docstrings and comments cite only what a reader can open: this repository's files and public sources.

The project's private research notes (the spec files and their sections) are not part of the repository, so no
tracked file may cite them; facts are stated where they are needed and the original code is cited by its public file
names (e.g. ChenRocks/UNITER ``model/pretrain.py``). ``bench/results`` holds generated outputs and is not scanned.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()
SKIPPED_DIRS = ("bench/results/",)

PRIVATE_CITATION = re.compile(
    r"spec\s*§"  # "spec §1.6"
    r"|(?<!paper )§"  # any other section sign: only "paper §N" names something a reader can open
    r"|\buniter\.md\b|\bextractor\.md\b|kernels-notes|gpu-anchors|villa-and-checkpoints"  # the notes' file names
    r"|\.\./shared"  # the notes' directory outside the repository
)


def private_citations(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of every line of ``text`` that cites the private notes."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if PRIVATE_CITATION.search(line)]


def tracked_text_files() -> list[str]:
    """Repository-relative paths of the tracked files that decode as UTF-8 text, outside ``SKIPPED_DIRS``."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    names = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True)
        .stdout.decode("utf-8")
        .split("\0")
    )
    paths = []
    for name in filter(None, names):
        path = ROOT / name
        if name.startswith(SKIPPED_DIRS) or name == THIS_FILE or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        paths.append(name)
    return paths


def test_the_matcher_finds_citations_of_the_private_notes() -> None:
    assert private_citations("Keys as in spec §1.6.")
    assert private_citations("see `uniter.md` §3.4")
    assert private_citations("(kernels-notes §1.2: NaN at small beta)")
    assert private_citations("the exact list of extractor.md")
    assert private_citations("gpu-anchors and villa-and-checkpoints")
    assert private_citations("read ../shared/spec first")
    assert private_citations("against the formulas (§2.6)")
    assert private_citations("ok\nline two cites uniter.md\nok") == [(2, "line two cites uniter.md")]


def test_the_matcher_leaves_public_citations_alone() -> None:
    assert not private_citations("the original ``model/pretrain.py`` ``forward_mrc`` (ChenRocks/UNITER)")
    assert not private_citations("Xie et al., arXiv 1802.04307; the UNITER paper §3.1")
    assert not private_citations("uniter_fast/tasks/spec.py defines AotSpec specs; docs/uniter_fast.md")


def test_no_tracked_file_cites_the_private_notes() -> None:
    files = tracked_text_files()
    assert len(files) > 100 and "README.md" in files and "uniter_fast/layout.py" in files, files[:5]
    found = [
        f"{name}:{n}: {line}"
        for name in files
        for n, line in private_citations((ROOT / name).read_text(encoding="utf-8"))
    ]
    assert not found, "cite public files instead of the private notes:\n" + "\n".join(found)
