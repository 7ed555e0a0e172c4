"""uniter_fast.files: atomic files, and directories built once by whichever process comes first."""

from __future__ import annotations

import os
import shutil

import pytest

from uniter_fast.files import atomic_directory, atomic_write, build_directory_once, read_json, write_json_atomic


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temp(tmp_path) -> None:
    path = str(tmp_path / "meta.json")
    write_json_atomic(path, {"a": 1})

    def fail(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert read_json(path) == {"a": 1} and os.listdir(tmp_path) == ["meta.json"]


def test_tmp_suffix_names_the_temporary_file(tmp_path) -> None:
    seen = []
    atomic_write(str(tmp_path / "x.npz"), lambda tmp: seen.append(os.path.basename(tmp)), tmp_suffix=".tmp-r3")
    assert seen[0].startswith(".tmp-") and seen[0].endswith("-x.npz.tmp-r3")
    atomic_write(str(tmp_path / "y.png"), lambda tmp: seen.append(os.path.basename(tmp)))
    assert seen[1].endswith(".png")  # the target's extension: writers that infer the format from the name work


def test_build_directory_once_builds_once_and_a_late_builder_keeps_the_first_copy(tmp_path) -> None:
    target = str(tmp_path / "cache" / "corpus")
    calls = []

    def build(out: str) -> None:
        calls.append(out)
        os.makedirs(out)
        with open(os.path.join(out, "data"), "w", encoding="utf-8") as f:
            f.write(str(len(calls)))

    assert build_directory_once(target, build) == target
    assert build_directory_once(target, build) == target and len(calls) == 1  # exists: not built again

    def racing_build(out: str) -> None:  # another process renames its copy into place while this one builds
        build(out)
        os.rename(str(tmp_path / "other"), target)

    shutil.rmtree(target)
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "data").write_text("other", encoding="utf-8")
    build_directory_once(target, racing_build)
    with open(os.path.join(target, "data"), encoding="utf-8") as f:
        assert f.read() == "other"  # the first rename wins; the loser's copy is discarded
    assert sorted(os.listdir(tmp_path / "cache")) == ["corpus"]


def test_build_directory_once_removes_a_failed_build(tmp_path) -> None:
    def fail(out: str) -> None:
        os.makedirs(out)
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        build_directory_once(str(tmp_path / "d"), fail)
    assert os.listdir(tmp_path) == []


def test_atomic_directory_appears_complete_or_not_at_all(tmp_path) -> None:
    target = str(tmp_path / "db")
    with pytest.raises(ValueError):
        with atomic_directory(target) as tmp:
            open(os.path.join(tmp, "part"), "w").close()
            raise ValueError("bad record")
    assert os.listdir(tmp_path) == []
    with atomic_directory(target) as tmp:
        open(os.path.join(tmp, "done"), "w").close()
    assert os.listdir(target) == ["done"]
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(target):
            pass


def test_atomic_directory_replace_swaps_the_whole_directory(tmp_path) -> None:
    target = str(tmp_path / "export")
    with atomic_directory(target) as tmp:
        (tmp_path / tmp / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):  # a failed replacement keeps the previous directory whole
        with atomic_directory(target, replace=True) as tmp:
            (tmp_path / tmp / "new.bin").write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(target) == ["old.bin"]
    with atomic_directory(target, replace=True) as tmp:
        (tmp_path / tmp / "new.bin").write_text("new")
    assert os.listdir(target) == ["new.bin"] and os.listdir(tmp_path) == ["export"]  # no leftovers


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_and_directories_have_the_modes_of_plain_writes(tmp_path, umask) -> None:
    """mkstemp / mkdtemp would give 0600 / 0700: results, logs and exports must be readable as a plain open() makes
    them (0666 / 0777 less the umask)."""
    old = os.umask(umask)
    try:
        write_json_atomic(str(tmp_path / "results.json"), {"r_mean": 0.5})
        with open(tmp_path / "plain.json", "w", encoding="utf-8") as f:
            f.write("{}")
        with atomic_directory(str(tmp_path / "export")) as tmp:
            atomic_write(os.path.join(tmp, "model.bin"), lambda p: open(p, "wb").close())
        os.makedirs(tmp_path / "plain_dir")
        built = build_directory_once(str(tmp_path / "cache"), os.makedirs)
    finally:
        os.umask(old)

    def mode(path: str) -> int:
        return os.stat(path).st_mode & 0o777

    assert mode(str(tmp_path / "results.json")) == mode(str(tmp_path / "plain.json")) == 0o666 & ~umask
    assert mode(str(tmp_path / "export" / "model.bin")) == 0o666 & ~umask
    assert mode(str(tmp_path / "export")) == mode(str(tmp_path / "plain_dir")) == 0o777 & ~umask
    assert mode(built) == 0o777 & ~umask
