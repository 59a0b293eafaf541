"""Run directories: a unique default name, an atomic claim, and what a directory already holds.

A run owns its directory while it lives by an exclusive ``flock`` on ``<run>/.run.lock`` (the
kernel drops the lock when the process ends, even by SIGKILL, so a dead run never blocks its
directory). A default directory ``runs/<name>/<timestamp>-<random>`` is created with ``mkdir``,
which fails if another run created it first, so runs started together never share one.
Nothing else is written into a directory before its claim.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import IO

LOCK_FILE = ".run.lock"


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory."""


@dataclass
class RunState:
    """What a run directory holds: checkpoints, and the status of its ``summary.json``."""

    checkpoints: list[str]
    summary_status: str | None  # None: no summary.json

    @property
    def holds_run(self) -> bool:
        """A run whose results a new run would overwrite: it has checkpoints, or it finished.

        A run that failed or was stopped before its first checkpoint holds nothing worth keeping,
        so it may start over in place.
        """
        return bool(self.checkpoints) or self.summary_status == "finished"


def run_state(root: str) -> RunState:
    """Inspect ``root`` (read only)."""
    checkpoints = sorted(glob.glob(os.path.join(root, "checkpoints", "*.ckpt")) + glob.glob(os.path.join(root, "hpc_ckpt_*.ckpt")))
    status = None
    path = os.path.join(root, "summary.json")
    if os.path.isfile(path):
        try:
            status = str(json.loads(open(path).read()).get("status", "finished"))  # no status: written before it existed
        except (OSError, ValueError, AttributeError):
            status = "finished"  # unreadable: keep it, to be safe
    return RunState(checkpoints, status)


def new_run_dir_name(base: str, name: str) -> str:
    """``base/name/<YYYYmmdd-HHMMSS>-<6 hex>``: a default run directory (created by ``RunDirClaim(new=True)``)."""
    return os.path.join(base, name, f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}")


class RunDirClaim:
    """An exclusive lock on ``root`` for as long as this object lives (or until :meth:`release`).

    ``new=True`` creates ``root`` with ``mkdir``, which fails if it exists (another run got there first);
    ``wait_s`` waits that long for a live holder to let go (a requeued job's previous incarnation).
    """

    def __init__(self, root: str, wait_s: float = 0.0, new: bool = False) -> None:
        self._file: IO[str] | None = None
        if new:
            os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
            try:
                os.mkdir(root)
            except FileExistsError:
                raise RunDirInUse(f"{root} was just created by another run") from None
        else:
            os.makedirs(root, exist_ok=True)
        self.root = root
        self._file = open(os.path.join(root, LOCK_FILE), "a+")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._file.seek(0)
                    owner = self._file.read().strip() or "?"
                    self.release()
                    raise RunDirInUse(f"{root} is in use by another run (pid {owner})") from None
                time.sleep(0.5)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None
