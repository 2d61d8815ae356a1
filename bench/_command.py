"""`python -m bench.NAME` for a benchmark without options of its own: `--help` describes it and
any argument is an error, rather than ignored while a run of minutes starts."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def run_benchmark(main: Callable[[], None], doc: str | None) -> None:
    """Parse the command line of the module run as __main__ (no options), then run `main`."""
    name = sys.modules["__main__"].__spec__.name.rpartition(".")[2]
    argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=f"Prints its tables and writes bench/results/{name}.json. "
                                   "`python -m bench --help` lists every benchmark.").parse_args()
    main()
