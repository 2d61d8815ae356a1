"""`python -m maskbank` and the `maskbank` command. Ctrl-C or SIGTERM while the command starts
(importing PyTorch and building the parser, which imports every method, take seconds) stops it as
it does later, with status 130 or 143, a line saying which, and no traceback."""

import os
import signal
import sys
import threading

from .interrupts import interrupted_status, raise_terminated, stopped_by


def run() -> int:
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # SIGTERM's default ended the process unannounced
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        from .cli import main

        code = main()
    except KeyboardInterrupt as interrupt:  # before the command ran (which says how it was stopped itself)
        print(f"\nmaskbank: {stopped_by(interrupt)}", file=sys.stderr)
        code = interrupted_status(interrupt)
    if main_thread:
        _finish_on_signal(code)
    return code


def _finish_on_signal(code: int) -> None:
    """Once the command has ended, Ctrl-C or SIGTERM ends the process at once with the command's own
    status. The interpreter's teardown (torch's, threads') takes up to seconds, and a signal there
    turned a finished training into status 143 with no word, or an 'Exception ignored' traceback."""

    def finish(signum, frame) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader gone, a stream closed: nothing more to say there
                pass
        os._exit(code)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, finish)


if __name__ == "__main__":
    raise SystemExit(run())
