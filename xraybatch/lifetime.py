"""Child processes die with their parent, whatever ends the parent (a signal, SIGKILL, a crash).

Two mechanisms, both Linux: ``PR_SET_PDEATHSIG`` (the kernel signals the child when its parent thread exits),
and, for a child whose parent is an intermediary (a multiprocessing forkserver), a thread that checks that the
original parent is still alive. A worker that is a process group leader is killed with its own children by
:func:`kill_group`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_CHECK_SECONDS = 1.0


def set_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent exits; ``False`` where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return int(libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0


def exit_when_parent_dies(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Signal this process with ``signum`` once ``parent_pid`` is gone (checked every second, in a thread)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid and not process_alive(parent_pid):
                os.kill(os.getpid(), signum)
                return
            threading.Event().wait(_CHECK_SECONDS)

    if not process_alive(parent_pid):
        os.kill(os.getpid(), signum)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def die_with_parent(parent_pid: int) -> None:
    """Initializer of a decode worker process: ignore SIGINT (the worker decides), die with ``parent_pid``.

    Ctrl-C reaches every process of the terminal's process group; the pipeline's worker handles it, its decode
    processes must not die of it mid-task (that broke the pool). The decode process's own parent is the
    forkserver, which exits when the worker does; ``parent_pid`` is the worker itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_parent_death_signal(signal.SIGKILL)
    exit_when_parent_dies(parent_pid, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, signum: int = signal.SIGKILL) -> None:
    """Send ``signum`` to the process group ``pgid``, if it still exists."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def install_stop_handlers(handler: Callable[[int, Any], None]) -> Callable[[], None]:
    """Handle SIGTERM and SIGINT with ``handler`` (main thread only); returns a function restoring the old ones.

    The handler sets a stop event instead of raising ``KeyboardInterrupt`` at an arbitrary point (inside a
    database driver's callback, say), so a signal is never swallowed.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, previous in old.items():
            signal.signal(sig, previous)

    return restore
