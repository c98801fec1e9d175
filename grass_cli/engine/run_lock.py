"""One live run per run folder: RUN_DIR/.grass-lock.

Two `grass train` processes in one folder would interleave metrics.jsonl and
checkpoints, and `--overwrite` in one would delete the other's files under it. So a
run holds an exclusive `flock` on RUN_DIR/.grass-lock from before its first check
of the folder until it ends, and writes who it is into the file (pid, host, start
time, command) so that a refused start can name the live process.

A kernel lock rather than a pid file: the kernel drops it when the process dies,
however it dies (SIGKILL, OOM killer, power), so a stale lock is never mistaken for a
live one and never needs a pid check that a reused pid would fool. The file a dead
run leaves behind still holds its details; the next run takes the lock over and
says whose it was. A finished run removes the file, and a start refused before
writing anything removes the folders it made for the lock. Readers (`grass eval`, `plot`,
`inspect-importance`) take no lock: they only read files grass writes atomically.

Within one process the lock is re-entrant (a notebook that builds a run twice in
one folder is one process, not two). On systems without `fcntl` (Windows) there is
no lock. Under torchrun rank 0 alone takes it; a refused rank 0 ends the job.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_cli.errors import GrassError

LOCK = ".grass-lock"
_held: dict[str, RunLock] = {}


@dataclass
class RunLock:
    """The held lock on one run folder; `stale` is what a dead run left in the file."""

    path: Path
    fd: int
    stale: dict[str, Any] | None = None
    created: list[Path] = field(default_factory=list)  # folders made for it, deepest first
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Remove the file (still ours: we hold its lock) and drop the lock."""
        if self._released:
            return
        self._released = True
        _held.pop(str(self.path), None)
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        for folder in self.created:  # a start refused before any file: nothing left
            try:
                folder.rmdir()
            except OSError:
                break  # (not empty: the run wrote there)


def acquire(run_dir: Path) -> RunLock | None:
    """Lock `run_dir` for this process (creating the folder), or one GrassError naming
    the live run that holds it. None where locks are unavailable, and for a folder of
    files grass did not write (the start checks refuse it; nothing is added to it)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        return None
    from grass_cli.engine.run_dir import is_run_dir

    foreign = run_dir.is_dir() and not is_run_dir(run_dir)
    if foreign and any(p.name != LOCK for p in run_dir.iterdir()):
        return None
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = (run_dir / LOCK).resolve()
    if str(path) in _held:
        return _held[str(path)]
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise live_error(run_dir, info) from None
        # the releasing owner may have unlinked the file between our open and our
        # lock: then we locked a file nobody else will ever open; try again
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _read(fd) or None
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    lock = RunLock(path, fd, stale, [d.resolve() for d in created])
    _held[str(path)] = lock
    return lock


def check_not_live(run_dir: Path) -> None:
    """Refuse a start into a folder a live run holds (pre-flight: before the folder's
    other checks, whose advice would be wrong for a live run)."""
    info = holder(run_dir)
    if info is not None:
        raise live_error(run_dir, info)


def holder(run_dir: Path) -> dict[str, Any] | None:
    """Who holds `run_dir`'s lock now, or None when no live run does."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe(info: dict[str, Any]) -> str:
    """'process 123 on host h since T (grass train r.yaml)', as much as is known."""
    if not info:
        return "a process whose details are not readable"
    text = f"process {info.get('pid', '?')} on {info.get('host', '?')}"
    if info.get("started"):
        text += f" since {info['started']}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def live_error(run_dir: Path, info: dict[str, Any]) -> GrassError:
    """The one message for a start refused by a live run."""
    pid = info.get("pid")
    same_host = info.get("host") == socket.gethostname()
    stop = (
        f"stop it with `kill -TERM {pid}` (it saves a checkpoint first)"
        if pid and same_host
        else "stop it"
    )
    return GrassError(
        f"a run is live in this folder: {describe(info)}",
        where=f"output.dir: {run_dir}",
        hint=f"wait for it to finish, {stop} and resume with --resume auto, or choose "
        "another output.dir",
    )
