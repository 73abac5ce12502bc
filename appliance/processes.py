"""How `exo` starts its children (the local nodes, the embedded mosquitto).

Each gets a process group of its own, so a Ctrl-C in the terminal reaches `exo` alone, which then
stops them in order: the coordinator, the nodes, the broker last (were the broker the first to
die, everyone else would end with connection errors). On Linux a child also gets SIGTERM when
`exo` dies without stopping it (SIGKILL), so nothing is left running.
"""
from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1


def child_process() -> dict:
    """Keyword arguments for subprocess.Popen."""
    return {"process_group": 0, "preexec_fn": _die_with_parent if sys.platform == "linux" else None}


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
