"""Benchmarks write to output/bench/ (untracked) by default; the committed figures under bench/results/ only with
--refresh-results, in every script."""

from __future__ import annotations

import argparse
import ast
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)
import gpu_suite  # noqa: E402
import harness  # noqa: E402

WRITERS = ("write_json", "plot_grouped_bars")


def test_results_go_to_an_untracked_dir_unless_asked(tmp_path, monkeypatch) -> None:
    parser = argparse.ArgumentParser()
    harness.add_output_arguments(parser)
    assert harness.output_dir(parser.parse_args([])) == harness.OUTPUT_DIR
    assert (
        harness.output_dir(parser.parse_args(["--refresh-results"]))
        == harness.RESULTS_DIR
        == os.path.join(BENCH, "results")
    )
    assert os.path.relpath(harness.OUTPUT_DIR, ROOT).split(os.sep)[0] == "output"
    with open(os.path.join(ROOT, ".gitignore"), encoding="utf-8") as f:
        assert "output/" in f.read().split()  # git ignores it
    monkeypatch.setattr(harness, "OUTPUT_DIR", str(tmp_path))
    args = gpu_suite.parse_args(["--device", "cpu"])
    assert gpu_suite.default_out(args) == os.path.join(harness.OUTPUT_DIR, "gpu_suite_cpu")
    args = gpu_suite.parse_args(["--device", "cpu", "--refresh-results"])
    assert gpu_suite.default_out(args) == os.path.join(BENCH, "results", "gpu_suite_cpu")
    path = harness.write_json("probe", torch.device("cpu"), [], {}, harness.output_dir(parser.parse_args([])))
    assert path.startswith(harness.OUTPUT_DIR)


def test_every_script_names_where_its_results_go() -> None:
    """Each call of the writers passes a directory, and a script that writes has the --refresh-results option; no
    file but bench/harness.py names bench/results' directory itself."""
    for name in sorted(os.listdir(BENCH)):
        if not name.endswith(".py") or name == "harness.py":
            continue
        with open(os.path.join(BENCH, name), encoding="utf-8") as f:
            source = f.read()
        calls = [
            node
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in WRITERS
        ]
        for call in calls:
            given = len(call.args) + len(call.keywords)
            assert given == (5 if call.func.id == "write_json" else 8) or any(
                k.arg == "directory" for k in call.keywords
            ), f"{name}:{call.lineno}: {call.func.id} without a directory"
        if calls and '__name__ == "__main__"' in source:  # a script, not a module of the GPU suite
            assert "add_output_arguments" in source, name
        assert "RESULTS_DIR" not in source, name
