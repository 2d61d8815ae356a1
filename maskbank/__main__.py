"""`python -m maskbank` and the `maskbank` command. Ctrl-C or SIGTERM while the command starts
(importing PyTorch and building the parser, which imports every method, take seconds) stops it as
it does later, with status 130 or 143, a line saying which, and no traceback."""

import signal
import sys
import threading

from .interrupts import interrupted_status, raise_terminated, stopped_by


def run() -> int:
    if threading.current_thread() is threading.main_thread():  # SIGTERM's default ended the process unannounced
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        from .cli import main

        return main()
    except KeyboardInterrupt as interrupt:  # before the command ran (which says how it was stopped itself)
        print(f"\nmaskbank: {stopped_by(interrupt)}", file=sys.stderr)
        return interrupted_status(interrupt)


if __name__ == "__main__":
    raise SystemExit(run())
