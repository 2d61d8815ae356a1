"""A child server stops with the process that started it: the child's half of maskbank.process.ChildServer,
kept apart so that every `maskbank` command can call it without importing the server."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_VARIABLE = "MASKBANK_STOP_WITH_PARENT"  # set by ChildServer for its child: the parent's pid
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_parent() -> None:
    """In a process a ChildServer started: SIGTERM it (a graceful stop) when its parent dies, even by
    SIGKILL, which leaves no chance to stop it otherwise; on Linux, through prctl(PR_SET_PDEATHSIG).
    Called at the child's start, in its own interpreter (not between fork and exec, where a threaded
    parent could deadlock). Linux sends the signal when the parent *thread* that started the child
    ends: start servers from a thread that outlives them (the main thread, as the demo and tests do)."""
    parent = os.environ.pop(PARENT_VARIABLE, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before the request: nobody is left to stop us
        os.kill(os.getpid(), signal.SIGTERM)
