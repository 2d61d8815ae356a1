"""`python -m maskbank` and the `maskbank` command. Ctrl-C while the command starts (importing
PyTorch and building the parser, which imports every method, take seconds) stops it as it does
later, with status 130 and no traceback."""

import sys


def run() -> int:
    try:
        from .cli import main

        return main()
    except KeyboardInterrupt:  # before the command ran (which says how it was stopped itself)
        print("\nmaskbank: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(run())
