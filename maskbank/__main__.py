"""`python -m maskbank` and the `maskbank` command. Ctrl-C while the command starts (importing
PyTorch takes seconds) stops it as it does later, with status 130 and no traceback."""

import sys


def run() -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("\nmaskbank: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
