"""Locks that keep processes sharing one store from breaking each other.

Two kinds, both `flock` on a file in the store folder, so the kernel drops them when their holder dies (a crash
never leaves a lock that must be cleaned by hand):
- the **writer lock** (`.writer.lock`), held for a whole command that writes tables or models: one writer at a
  time; a second one fails at once with "store is busy (pid N, `stack`, since …)". The file keeps its holder's
  pid and command for that message; a file left by a dead holder is simply taken over.
- the **database lock** (`.duckdb.lock`), held only while a DuckDB connection to `features.duckdb` is open:
  shared for read-only connections, exclusive for writing ones. DuckDB itself refuses to open a file another
  process is writing, so without it a reader (`sql`, `tables`) that opened the file at the wrong moment made
  the writer's next connect fail. Waiting is short: connections live for one manifest read or write.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from featurestore.errors import StoreBusy

log = logging.getLogger(__name__)

WRITER_LOCK = ".writer.lock"
DATABASE_LOCK = ".duckdb.lock"

# Locks this process already holds, by file: nested holders (a command that writes, a write inside it) pass
# through instead of waiting on themselves (flock locks of two descriptors of one process exclude each other).
_held: dict[str, list[int]] = {}  # path -> [holders in this process, fd]
_held_guard = threading.RLock()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (temp files and staging folders carry their writer's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _holder_text(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "another process"
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')}, `{holder.get('command')}`, since {holder.get('since')}"


@contextmanager
def _flock(path: Path, operation: int) -> Iterator[int | None]:
    """flock `path` for the block, once per process: a nested holder (the same thread, or another thread of this
    process: builders build at once on a distributed engine) gets None and passes straight through; the flock is
    released when the last holder leaves, whichever thread took it.

    Raises BlockingIOError when `operation` has LOCK_NB and another process holds the lock."""
    key = str(path)
    if _enter_held(key):
        try:
            yield None
        finally:
            _leave_held(key)
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if operation & fcntl.LOCK_EX:
            raise
        # A reader on a store it cannot write (read-only mount, another user's files): nobody can be writing
        # through this folder's locks either, so a shared lock on what exists is enough, or none at all.
        if not path.exists():
            yield None
            return
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, operation)
    except BaseException:
        os.close(fd)
        raise
    with _held_guard:
        if key in _held:  # another thread of this process took it meanwhile: share that one
            _held[key][0] += 1
            os.close(fd)
            fd = None  # type: ignore[assignment]
        else:
            _held[key] = [1, fd]
    try:
        yield fd
    finally:
        _leave_held(key)


def _enter_held(key: str) -> bool:
    with _held_guard:
        if key in _held:
            _held[key][0] += 1
            return True
    return False


def _leave_held(key: str) -> None:
    """One holder leaves; the last one closes the file, which releases the flock."""
    with _held_guard:
        _held[key][0] -= 1
        if _held[key][0] > 0:
            return
        _, fd = _held.pop(key)
    os.close(fd)


@contextmanager
def writer_lock(root: Path, command: str) -> Iterator[None]:
    """Hold the store's writer lock for the block; raise StoreBusy at once when another process has it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / WRITER_LOCK
    entered = False
    try:
        with _flock(path, fcntl.LOCK_EX | fcntl.LOCK_NB) as fd:
            entered = True
            if fd is None:
                yield
                return
            left = os.pread(fd, 4096, 0)
            if left:
                log.info("taking over the store lock left by %s, which is no longer running", _holder_text(left))
            me = {"pid": os.getpid(), "command": command,
                  "since": datetime.now(UTC).replace(microsecond=0).isoformat()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
    except BlockingIOError:
        if entered:  # raised by the locked block itself, not by flock
            raise
        raise StoreBusy(f"store {root} is busy ({_holder_text(path.read_bytes())}); wait for that command to "
                        "finish, one writer at a time") from None


@contextmanager
def database_lock(root: Path, exclusive: bool) -> Iterator[None]:
    """Shared (readers) or exclusive (a writing connection) lock around one DuckDB connection; waits."""
    with _flock(root / DATABASE_LOCK, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH):
        yield
