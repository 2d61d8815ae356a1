"""Ctrl-C and SIGTERM stop every command the same way: an exception that unwinds (so children are
stopped and messages said), a line that says which, and the shell's status (130 or 143)."""

from __future__ import annotations

import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's, `timeout`'s, `docker stop`'s): unwinds like Ctrl-C, so every command stops
    as cleanly (a demo's server child stopped, a training run's message said), with status 143."""


def raise_terminated(signum, frame) -> None:
    raise Terminated()


def stopped_by(interrupt: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"


def interrupted_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's status for a process stopped by that signal: 128 + its number."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
