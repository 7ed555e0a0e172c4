"""``python -m uniter_fast.extract``: see :mod:`uniter_fast.extract.cli`."""

from uniter_fast.entry import run_command
from uniter_fast.extract.cli import main

if __name__ == "__main__":
    run_command(main)
