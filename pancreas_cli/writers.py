"""Which process on which machine is writing: the tag in the names of temporary files and lock notes.

A temporary file is named after the process that writes it (``.pancseg.tmp-HOST.PID.…``), so
what a killed command left can be told from what a running one is writing without any lock: a
name of this machine whose pid no longer runs is a leftover. Another machine's names are never
judged (its processes cannot be seen from here). Standard library only: the CLI imports it early.
"""

from __future__ import annotations

import os
import re
import socket

HOST = socket.gethostname()
#: The host as file names spell it (no dots, so that the pid after it is found again).
HOST_TAG = re.sub(r"[^A-Za-z0-9-]", "_", HOST) or "host"


def tag() -> str:
    """``HOST.PID`` of this process (read each time: a forked child has its own pid)."""
    return f"{HOST_TAG}.{os.getpid()}"


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def dead_writer(tagged: str) -> bool:
    """Whether ``tagged`` (a name that starts ``HOST.PID.``) was written by a process of this machine
    that no longer runs; False for another machine's, an untagged name, or this process."""
    host, _, rest = tagged.partition(".")
    pid = rest.partition(".")[0]
    return host == HOST_TAG and pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid))
