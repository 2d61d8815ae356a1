"""Run benchmarks: `python -m bench` runs every module of bench/ that has a main(); `python -m bench
storage` runs only bench/storage.py (several names run in the order given)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import textwrap

import bench


def available() -> list[str]:
    """Names of the benchmark modules in bench/ (every public module with a main())."""
    names = [m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")]
    return [name for name in sorted(names) if hasattr(importlib.import_module(f"bench.{name}"), "main")]


def usage() -> str:
    """What `python -m bench --help` prints: how to call it and each benchmark's one-line summary."""
    lines = [__doc__.strip(), "", "Benchmarks (results go to bench/results/<name>.json):"]
    for name in available():
        first_paragraph = (importlib.import_module(f"bench.{name}").__doc__ or "").strip().split("\n\n")[0]
        lines.append(f"  {name:<16} {textwrap.shorten(first_paragraph, 100, placeholder=' ...')}")
    lines.append("\nEach describes itself: python -m bench.<name> --help; bench.serving also takes options "
                 "(e.g. --only task_mix).")
    return "\n".join(lines)


def run(names: list[str]) -> None:
    if {"-h", "--help"} & set(names):
        print(usage())
        return
    known = available()
    unknown = [name for name in names if name not in known]
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(known)})")
    for name in names or known:
        print(f"## {name}\n", flush=True)
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    run(sys.argv[1:])
