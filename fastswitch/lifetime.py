"""A child process that must not outlive its parent: the engine core under the API server, a
tensor-parallel rank under the engine core."""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to kill this process when its parent dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux with glibc: the idle check still notices
        pass
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        sys.exit(1)
