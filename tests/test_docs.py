"""Docs, docstrings and comments cite only what a reader can open: this repository's files and public sources.

Research notes kept outside the repository are not part of it, so no tracked file may cite them; facts are stated
where they are needed and the original code is cited by its public file names (e.g. ChenRocks/UNITER
``model/pretrain.py``). A citation of something a reader cannot open is found by its form, not by a list of names:
a section sign other than "paper §N", a ``.md`` file that is no file of the repository, a Markdown link to a path
that does not exist in the repository. ``bench/results`` holds generated outputs and is not scanned.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()
SKIPPED_DIRS = ("bench/results/",)

SECTION_SIGN = re.compile(r"(?<!paper )§")  # only "paper §N" names something a reader can open
MARKDOWN_NAME = re.compile(r"[\w.-]+\.md\b")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


@lru_cache(maxsize=1)
def tracked_names() -> tuple[frozenset[str], frozenset[str]]:
    """(every tracked path, every tracked file's base name) of the checkout."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.decode("utf-8")
    paths = frozenset(filter(None, out.split("\0")))
    return paths, frozenset(os.path.basename(p) for p in paths)


def _leaves_repository(target: str, source_dir: str) -> bool:
    """Whether a Markdown link ``target`` (relative to ``source_dir``) names no path of the repository."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # a URL or an anchor of this page
        return False
    path = os.path.normpath(os.path.join(source_dir, target.split("#")[0]))
    return path.startswith("..") or not (ROOT / path).exists()


def private_citations(text: str, path: str = "README.md") -> list[tuple[int, str]]:
    """(1-based line number, line) of every line of ``text`` (the file ``path``, relative to the repository) that
    cites something outside the repository; Markdown links are read in ``.md`` files only."""
    names = tracked_names()[1]
    source_dir, markdown = os.path.dirname(path), path.endswith(".md")
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        if (
            SECTION_SIGN.search(line)
            or any(name not in names for name in MARKDOWN_NAME.findall(line))
            or (markdown and any(_leaves_repository(t, source_dir) for t in MARKDOWN_LINK.findall(line)))
        ):
            found.append((n, line.strip()))
    return found


def tracked_text_files() -> list[str]:
    """Repository-relative paths of the tracked files that decode as UTF-8 text, outside ``SKIPPED_DIRS``."""
    paths = []
    for name in sorted(tracked_names()[0]):
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


def test_the_matcher_finds_citations_of_what_is_not_in_the_repository() -> None:
    assert private_citations("Keys as in notes §1.6.")
    assert private_citations("see `research-notes.md` for the list")
    assert private_citations("the exact list of [the notes](../../notes/list.md)", "docs/data.md")
    assert private_citations("[a page](missing-page.md#anchor)", "docs/data.md")
    assert private_citations("against the formulas (§2.6)")
    assert private_citations("ok\nline two cites notes.md\nok") == [(2, "line two cites notes.md")]


def test_the_matcher_leaves_public_citations_alone() -> None:
    assert not private_citations("the original ``model/pretrain.py`` ``forward_mrc`` (ChenRocks/UNITER)")
    assert not private_citations("Xie et al., arXiv 1802.04307; the UNITER paper §3.1")
    assert not private_citations("uniter_fast/tasks/spec.py defines AotSpec specs; docs/architecture.md")
    assert not private_citations("[Errors](../README.md#errors), [PyTorch](https://pytorch.org/docs)", "docs/data.md")
    assert not private_citations("[this page's table](#the-table)", "docs/data.md")
    assert not private_citations("return TABLE[name](x)", "uniter_fast/config.py")  # code, not a link


def test_no_tracked_file_cites_the_private_notes() -> None:
    files = tracked_text_files()
    assert len(files) > 100 and "README.md" in files and "uniter_fast/layout.py" in files, files[:5]
    found = [
        f"{name}:{n}: {line}"
        for name in files
        for n, line in private_citations((ROOT / name).read_text(encoding="utf-8"), name)
    ]
    assert not found, "cite the repository's files or public sources instead:\n" + "\n".join(found)


DEV_MACHINE_CD = re.compile(r"^\s*(?:\$\s*)?cd\s+/(?:work|root|home)/")  # a checkout path of one machine


def test_no_doc_command_changes_into_a_machine_specific_checkout() -> None:
    """Doc commands run from the repository root as a reader has it, so none starts with ``cd`` into one machine's
    checkout (``docs/losses.md`` once began its test commands with ``cd /work/main``)."""
    assert DEV_MACHINE_CD.match("cd /work/main && . .venv/bin/activate")
    assert not DEV_MACHINE_CD.match(". .venv/bin/activate   # cd /work/main")
    docs = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    found = [
        f"{name}:{n}: {line.strip()}"
        for name in docs
        for n, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1)
        if DEV_MACHINE_CD.match(line)
    ]
    assert not found, "doc commands run from the repository root:\n" + "\n".join(found)
