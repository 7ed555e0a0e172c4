"""``python -m uniter_fast.demo``: the browser demo's command (``uniter_fast.demo.cli``)."""

from uniter_fast.demo.cli import main
from uniter_fast.entry import run_command

if __name__ == "__main__":
    run_command(main)
