"""`python -m maskbank` and the `maskbank` command. Ctrl-C or SIGTERM while the command starts
(importing PyTorch and building the parser, which imports every method, take seconds) stops it as
it does later, with status 130 or 143, a line saying which, and no traceback; SIGHUP does not stop a
server that starts."""

import os
import signal
import sys
import threading

from .interrupts import interrupted_status, raise_terminated, stopped_by

# grpcio 1.81's aio server with the EventEngine poller it uses by default spends 5-7% more CPU per request
# than with the poller before it (bench/serving.py's "grpc poller" rows; README, Operating the server), so
# `serve` turns that experiment off unless GRPC_EXPERIMENTS is set. gRPC reads it once, when imported.
SERVE_GRPC_EXPERIMENTS = "-event_engine_poller_for_python"


def run() -> int:
    # gRPC's own informational lines (one per failed TLS handshake, say) are plain text on stderr, outside
    # the server's logs and --log-format json; its errors still show. Before grpc is imported.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    serving = _command_word(sys.argv[1:]) == "serve"
    if serving:
        os.environ.setdefault("GRPC_EXPERIMENTS", SERVE_GRPC_EXPERIMENTS)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # SIGTERM's default ended the process unannounced
        signal.signal(signal.SIGTERM, raise_terminated)
        if serving:  # a reload signal while it starts (it polls at start anyway)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # killed it unannounced; serve_forever handles it once listening
    try:
        from .cli import main

        return main()
    except KeyboardInterrupt as interrupt:  # before the command ran (which says how it was stopped itself)
        print(f"\nmaskbank: {stopped_by(interrupt)}", file=sys.stderr)
        return interrupted_status(interrupt)
    finally:
        if main_thread:
            _ignore_signals_from_now_on()


def _command_word(argv: list[str]) -> str | None:
    """The command word of a `maskbank` command line, read before the parser exists (building it imports
    every method): the first word that is not an option or --log-level's value (given whole or as a prefix)."""
    words = iter(argv)
    for word in words:
        if len(word) > 2 and "--log-level".startswith(word):  # argparse takes a prefix (--log-l) as the option
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _ignore_signals_from_now_on() -> None:
    """Once the command has ended (however: done, failed, stopped), Ctrl-C and SIGTERM are ignored, so
    the process exits with the command's own status. The interpreter's teardown (torch's, threads')
    takes up to seconds, and a signal there turned a finished training into status 143 with no word,
    or an 'Exception ignored' traceback. Ignoring, not a handler: the interpreter puts the default
    action back for signals with a Python handler before it tears modules down, not for ignored ones.
    SIGHUP too: serve handles it (a registry poll), and one during a stop's teardown exited 129."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    raise SystemExit(run())
