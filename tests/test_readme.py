"""The README's two commands are the ones CI and newcomers run: keep .ci/run in step with them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The bash code blocks of the README's "Two commands" section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_opens_with_the_main_job_and_the_test_command() -> None:
    main_job, test_command = readme_commands()
    assert main_job.endswith("deepspeed uniter_fast/pretrain.py --ds_config ds.json")
    assert "pytest" in test_command


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    _, test_command = readme_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci_lines
