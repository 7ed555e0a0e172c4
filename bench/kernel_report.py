"""AOT compile report: every Triton kernel of the project, every launch config its dispatcher uses, sm_90a and sm_80.

No GPU is needed. Each kernel module under ``kernels/`` (``uniter_fast.kernels``) lists its configs in
``aot_specs()``; every spec is compiled with ``triton.compile`` for each target and the register count, spills and
shared memory are printed. The exit status is 1 if any spec fails to compile or spills.

    python bench/kernel_report.py                      # everything, sm_90a and sm_80
    python bench/kernel_report.py --only ipot_fp32     # specs whose name contains a filter
    python bench/kernel_report.py --arch 90 --json bench/results/kernel_report.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pkgutil
import sys
import traceback

from tqdm import tqdm


def _reexec_without_interpreter() -> None:
    """Under TRITON_INTERPRET=1 ``@triton.jit`` gives interpreter objects that cannot be compiled: restart without."""
    if os.environ.get("TRITON_INTERPRET"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def discover_specs() -> list[tuple[str, object]]:
    """(module name, AotSpec) for every spec of every module in uniter_fast.kernels defining ``aot_specs``."""
    import uniter_fast.kernels as pkg

    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name == "aot":
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(module, "aot_specs"):
            found.extend((info.name, spec) for spec in module.aot_specs())
    return found


def main(argv: list[str] | None = None) -> int:
    """Compile, print the table, optionally write JSON; returns the exit status (1 on errors or spills)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 → sm_90a)")
    parser.add_argument("--only", action="append", default=[], help="keep specs whose name contains this")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    from harness import print_table
    from uniter_fast.kernels.aot import compile_spec

    specs = [(mod, s) for mod, s in discover_specs() if not args.only or any(f in s.name for f in args.only)]
    if not specs:
        print("no kernel specs matched", file=sys.stderr)
        return 1
    rows, failures = [], []
    for module, spec, capability in tqdm(
        [(m, s, a) for m, s in specs for a in args.arch], desc="compiling", unit="spec", file=sys.stderr
    ):
        try:
            result = dataclasses.asdict(compile_spec(spec, capability))
        except Exception as exc:  # a compile error is a report line, then a failing exit status
            failures.append(f"{spec.name} sm_{capability}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            continue
        result["module"] = module
        rows.append(result)
        if result["spill_stores"] or result["spill_loads"]:
            failures.append(f"{spec.name} {result['arch']}: spills {result['spill_stores']}/{result['spill_loads']} B")
    print_table(
        rows, ["module", "name", "arch", "num_warps", "registers", "spill_stores", "spill_loads", "shared_bytes"]
    )
    if args.json:
        from uniter_fast.files import write_json_atomic

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json_atomic(args.json, {"rows": rows, "failures": failures}, indent=2)
    for line in failures:
        print("FAIL", line, file=sys.stderr)
    print(f"{len(rows)} compiled, {len(failures)} failures", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    _reexec_without_interpreter()
    sys.exit(main())
