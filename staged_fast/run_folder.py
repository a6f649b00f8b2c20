"""One owner per run folder (--save_prefix): an exclusive lock, and the leftovers of interrupted writes.

The lock is `flock` on `<run>/.lock`, taken by the process that writes the run (rank 0 of a DDP job) for
its whole life. The kernel drops it when that process dies, however it dies (exit, exception, kill -9), so
a lock file left behind by a killed run is stale and the next run simply takes it. While held, the file
names the holder (host, pid, start time, command) for the message a second run gets. Released, the file is
unlinked (a folder a failed start created is removed again when empty, so bad input leaves nothing); a
contender that opened the old file re-checks after locking that it holds the file the path names, and
retries otherwise. On filesystems without flock (some network mounts) the run goes on unlocked, with a
warning. No torch import here: a lock holder in a test or a script starts fast.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"  # checkpoint.py writes, replaces and prunes through folders named so


class RunFolderError(RuntimeError):
    """The run folder cannot be owned (in use by another run, or not writable); the message says what to do."""


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    return missing


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, flag: str = "--save_prefix", name: str = LOCK_NAME,
                 role: str = "a run folder"):
        self.run_dir = Path(run_dir)
        self.flag = flag  # the command's name for the folder, in messages
        self.role = role  # what the folder is, in messages
        self.path = self.run_dir / name  # several locks may share a folder (the data cache: one per entry)
        self._fd: int | None = None
        self._created: list[Path] = []
        self.warning: str | None = None  # set when the filesystem cannot lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: Callable[[dict | None], None] | None = None) -> "RunLock":
        """Take the lock or raise RunFolderError naming the holder; with `wait`, call wait(holder) instead and
        block until the holder lets go. Creates the folder if needed."""
        self._created = _missing_dirs(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    if wait is None:
                        os.close(fd)
                        raise RunFolderError(self._busy_message(holder)) from None
                    wait(holder)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX)
                    except BaseException:  # an OSError, or Ctrl-C during the wait
                        os.close(fd)
                        raise
                except OSError as e:  # ENOLCK / EOPNOTSUPP: a filesystem without flock
                    self.warning = (f"warning: cannot lock {self.path} ({e.strerror}); nothing stops a second run "
                                    f"from writing into {self.run_dir} at the same time")
                    break
                if _same_file(fd, self.path):
                    break
                os.close(fd)  # the holder released and unlinked it between our open and our lock: retry
        except PermissionError as e:
            self._remove_created()
            raise RunFolderError(
                f"{self.flag} {self.run_dir} is not writable ({e.strerror}: {e.filename}). Choose a folder you "
                f"can write to, or fix its permissions."
            ) from e
        except RunFolderError:
            self._remove_created()
            raise
        except OSError as e:
            self._remove_created()
            raise RunFolderError(
                f"{self.flag} {self.run_dir} cannot be used as {self.role} ({os_error_text(e)}). "
                f"Choose another {self.flag}."
            ) from e
        holder = dict(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                      command=" ".join(sys.argv)[:500])
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlink and unlock; remove the folders `acquire` created if they are still empty."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self.warning is None and _same_file(fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(fd)
        self._remove_created()

    def _remove_created(self) -> None:
        for d in self._created:  # deepest first; stops at the first that holds something
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []

    def _busy_message(self, holder: dict | None) -> str:
        return (
            f"{self.flag} {self.run_dir} is in use by another run: {describe_holder(holder)}. Two runs on one folder would overwrite "
            f"each other's checkpoints and logs. Wait for that run to finish (or stop it), or give this one another "
            f"{self.flag}. The lock ({self.path}) is released when its holder exits or dies."
        )

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def os_error_text(e: OSError) -> str:
    """'strerror: file', or the strerror alone where the error names no file (a failed flock)."""
    return f"{e.strerror}: {e.filename}" if e.filename else str(e.strerror or e)


def describe_holder(holder: dict | None) -> str:
    """Who holds a lock, from what it wrote into the lock file."""
    if not holder:
        return "a process that has not written its name yet"
    who = f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
    return who + (f" ({holder['command']})" if holder.get("command") else "")


def _read_holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove_leftovers(run_dir: str | os.PathLike, prefixes: tuple[str, ...] = (TMP_PREFIX,)) -> tuple[int, int]:
    """Remove the folders and files named `prefixes`* that interrupted writes left in `run_dir` (`.tmp-*`; the
    data cache names its own): only the lock holder may (a write in progress looks the same). Returns (entries
    removed, bytes freed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return 0, 0
    count = freed = 0
    for entry in run_dir.iterdir():
        if not entry.name.startswith(prefixes):
            continue
        if entry.is_dir() and not entry.is_symlink():
            freed += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(entry, ignore_errors=True)
        else:
            freed += entry.lstat().st_size
            entry.unlink(missing_ok=True)
        count += 1
    return count, freed
