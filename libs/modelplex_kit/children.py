"""Child processes that die with their parent, however the parent ends.

``finally`` blocks and fixture teardowns do not run when a parent is killed or
crashes; a server left behind keeps its port and its memory. The kernel's
parent-death signal (Linux ``PR_SET_PDEATHSIG``) covers those cases. It fires
when the *thread* that spawned the child exits, so spawn from a thread that
lives as long as the child (the main thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child, between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


def tied_to_parent() -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments for a child that gets SIGTERM when this process dies.

    The child also gets its own process group: a Ctrl-C in the terminal reaches
    only the parent, which then stops its children in order.
    """
    options: dict[str, Any] = {"process_group": 0}
    if sys.platform.startswith("linux"):
        options["preexec_fn"] = _die_with(os.getpid())
    return options
