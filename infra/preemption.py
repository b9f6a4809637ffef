"""Preemption: when a run must checkpoint and stop, and how it says it stopped early.

A training is asked to stop by SIGTERM (a scheduler's preemption, ``kill``), or by losing its launcher: when the
``deepspeed`` runner or ``torchrun`` that started it dies, a trainer left running would train on, orphaned, to the
end. The kernel sends this process SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), and ``PreemptionWatch``
also notices when any launcher further up (the ``deepspeed`` runner above its ``launch.py``) is gone.

A preempted run checkpoints, exports nothing, and exits with ``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL``: try again),
so no caller mistakes it for a finished run; running it again resumes it.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
PR_SET_PDEATHSIG = 1
# Command-line words that mark an ancestor process as a launcher whose death must stop the training.
LAUNCHER_WORDS = ("deepspeed", "torch.distributed.run", "torchrun", "torch.distributed.launch")
MAX_ANCESTORS = 4


class Preempted(Exception):
    """The run stopped before ``max_steps`` because it was asked to; its last checkpoint holds the state."""


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a process from /proc, or None when it is gone (or there is no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):  # exited, not yet reaped
        return None
    return int(fields[1]), fields[19]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_ancestors(pid: int | None = None) -> list[tuple[int, str, str]]:
    """(pid, start time, command) of the launchers among this process's nearest ancestors."""
    out, current = [], pid if pid is not None else os.getpid()
    for _ in range(MAX_ANCESTORS):
        stat = _stat(current)
        if stat is None or stat[0] <= 1:
            break
        parent = stat[0]
        parent_stat = _stat(parent)
        if parent_stat is None:
            break
        command = _cmdline(parent)
        if any(word in command for word in LAUNCHER_WORDS):
            out.append((parent, parent_stat[1], command))
        current = parent
    return out


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class PreemptionWatch:
    """``reason()`` says why the run should stop now (SIGTERM, a launcher gone), or None. Use as a context manager:
    it installs the SIGTERM handler and the parent-death signal, and restores the handler on exit."""

    def __init__(self):
        self._reason: str | None = None
        self._previous = None
        self._parent = os.getppid()
        self._launchers = launcher_ancestors()

    def __enter__(self) -> "PreemptionWatch":
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        die_with_parent(signal.SIGTERM)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame) -> None:
        if os.getppid() != self._parent:  # the kernel's parent-death signal: say so, not just "SIGTERM"
            command = next((c.strip()[:120] for pid, _, c in self._launchers if pid == self._parent), "")
            launcher = f"pid {self._parent}: {command}" if command else f"pid {self._parent}"
            self._reason = self._reason or f"the launcher ({launcher}) is gone"
        self._reason = self._reason or "SIGTERM received"

    def reason(self) -> str | None:
        if self._reason is None:
            for pid, started, command in self._launchers:
                stat = _stat(pid)
                if stat is None or stat[1] != started:  # gone (or its pid reused by another process)
                    self._reason = f"the launcher (pid {pid}: {command.strip()[:120]}) is gone"
                    break
        return self._reason
