"""A lock file that serialises writers of one project, on local disks and network shares, on every platform.

``fcntl`` does not exist on Windows and ``flock`` is not reliable on NFS, but
creating a file with ``O_CREAT | O_EXCL`` is atomic on local file systems, on
NFS (v3 and later) and on SMB (``CREATE_NEW``): exactly one process creates
the lock file, the others wait. The file holds its owner (host, pid, process
start time, purpose, time, a random token) so that a waiter can tell who
holds it and whether the holder is gone.

A lock is **stale**, and is broken, when its holder is a process of this host
that no longer runs (or a new process with the holder's pid), or when it is
older than ``stale_after`` seconds (the only test for a holder on another
host, whose processes cannot be seen). Locks are held only while a change is
written (milliseconds to seconds), never while a user thinks, so a generous
``stale_after`` costs nothing while the holder lives. Breaking is itself
serialised by a second lock file, and the lock is removed only when it still
holds the token judged stale, so two waiters never break a fresh lock.

Waiting is fair enough that a process writing box after box (the oracle, a
script) cannot starve another: a waiter touches ``<lock>.waiting``, and a
holder that finds it on release steps aside for a moment before its next
acquisition. No clocks are compared, so hosts with skewed clocks behave alike.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType


class LockTimeout(TimeoutError):
    """A lock that another process held for longer than the caller would wait."""


@dataclass(frozen=True)
class LockSettings:
    """How long to wait for a lock and when a held one counts as abandoned."""

    timeout: float = 60.0  # seconds to wait before giving up with LockTimeout
    stale_after: float = 600.0  # a lock older than this is broken (a holder on another host cannot be checked otherwise)
    poll: float = 0.01  # first wait between tries; doubles up to max_poll
    max_poll: float = 0.05
    step_aside: float = 0.15  # a holder that kept others waiting waits this long before taking the lock again


def this_host() -> str:
    return socket.gethostname()


def pid_namespace() -> str | None:
    """Linux's pid namespace of this process: two containers with one host name do not see each other's pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except (OSError, AttributeError):
        return None


def process_start_time(pid: int) -> str | None:
    """The start time of a process where the system tells it cheaply (Linux), to tell a reused pid from its holder."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True when a process with this pid runs on this host (zombies count as dead).

    It asks psutil, as the job runners do (``jobs.local.worker_alive``); where
    psutil is not installed yet (the Slicer panel before its dependencies), the
    system directly. On Windows ``os.kill(pid, 0)`` would terminate the
    process, so the process is opened and its exit code read instead.
    """
    if pid <= 0:
        return False
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # a ZombieProcess is one too
            return False
        except psutil.AccessDenied:  # another user's process: it exists
            return True
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        try:
            code = ctypes.c_ulong()
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    if os.path.isdir("/proc/self"):  # Linux: the state letter tells a zombie from a live process
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        except FileNotFoundError:
            return False
        except (OSError, IndexError):
            pass
    # no /proc (macOS): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_info(purpose: str) -> dict:
    """Who takes a lock or a claim: host, pid, process start time, purpose, time (UTC and epoch) and a random token."""
    return {
        "host": this_host(),
        "pid": os.getpid(),
        "pid_started": process_start_time(os.getpid()),
        "pid_namespace": pid_namespace(),
        "purpose": purpose,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "epoch": time.time(),
        "token": os.urandom(8).hex(),
    }


def holder_gone(info: dict) -> bool:
    """True when the owner recorded in ``info`` is a process of this host that has ended (or whose pid was reused).

    A process of another host, or of another pid namespace (a container with the same host name), cannot be
    seen from here: only its age tells (see ``LockSettings.stale_after``).
    """
    if info.get("host") != this_host():
        return False
    if info.get("pid_namespace") and pid_namespace() and info["pid_namespace"] != pid_namespace():
        return False
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if not pid_alive(pid):
        return True
    started = info.get("pid_started")
    return started is not None and process_start_time(pid) not in (None, started)


def describe_holder(info: dict | None) -> str:
    if not info:
        return "an unknown process (the lock file is empty or unreadable)"
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('purpose') or 'no purpose given'}) since {info.get('time')}"


class FileLock:
    """An exclusive lock file ``path``; reentrant within the thread that holds it, so nested writes take it once.

    Use as ``with lock.hold("what is written"):``. The file is created atomically and
    removed on release only while it still holds this holder's token.
    """

    def __init__(self, path: Path | str, settings: LockSettings | None = None, what: str | None = None):
        self.path = Path(path)
        self.settings = settings or LockSettings()
        self.what = what or str(self.path.parent)  # named in errors: the project, the job
        self._thread_lock = threading.RLock()  # threads of this process wait here, not on the file
        self._depth = 0
        self._token: str | None = None
        self._step_aside = False  # someone waited for our last hold: let them go first

    @property
    def waiting_path(self) -> Path:
        return self.path.with_name(self.path.name + ".waiting")

    @property
    def held(self) -> bool:
        return self._depth > 0

    def hold(self, purpose: str = "", timeout: float | None = None) -> "_Held":
        return _Held(self, purpose, timeout)

    def acquire(self, purpose: str = "", timeout: float | None = None) -> None:
        timeout = self.settings.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self._thread_lock.acquire(timeout=max(timeout, 0.0)):
            raise LockTimeout(f"{self.what}: another thread of this process holds its lock; waited {timeout:g} s")
        if self._depth:
            self._depth += 1
            return
        try:
            if self._step_aside:
                self._step_aside = False
                time.sleep(min(self.settings.step_aside, max(0.0, deadline - time.monotonic())))
            self._token = self._acquire_file(purpose, deadline, timeout)
        except BaseException:
            self._thread_lock.release()
            raise
        self._depth = 1

    def release(self) -> None:
        if not self._depth:
            raise RuntimeError(f"{self.path}: released without being held")
        self._depth -= 1
        if not self._depth:
            try:
                holder = self.read_holder()
                if holder and holder.get("token") == self._token:  # a lock broken as stale meanwhile is not ours
                    _unlink(self.path)
                if self.waiting_path.exists():  # another process waited: it goes before our next hold
                    self._step_aside = True
                    _unlink(self.waiting_path)
            finally:
                self._token = None
                self._thread_lock.release()
        else:
            self._thread_lock.release()

    def read_holder(self) -> dict | None:
        """The holder's record, {} while it is being written, None when nobody holds the lock."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            info = json.loads(text)
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    def _acquire_file(self, purpose: str, deadline: float, timeout: float) -> str:
        info = owner_info(purpose)
        data = json.dumps(info).encode()
        wait = self.settings.poll
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if not self._break_if_stale():
                    _touch(self.waiting_path)
            except PermissionError:
                if sys.platform != "win32" or not self.path.parent.is_dir():
                    raise  # a folder we may not write: no waiting helps
                # Windows: the lock file is being deleted while another process still reads it
            else:
                try:
                    try:
                        _write_all(fd, data)
                    finally:
                        os.close(fd)
                except OSError as e:
                    # a full disk (or a quota): an empty lock file left here would hold every later writer off
                    # until it counts as stale, so take it away and say which file could not be written
                    _unlink(self.path)
                    raise OSError(e.errno, f"{self.what}: cannot write its lock file ({e.strerror})", str(self.path)) from e
                return info["token"]
            if time.monotonic() >= deadline:
                holder = self.read_holder()
                raise LockTimeout(
                    f"{self.what} is locked by {describe_holder(holder)}; waited {timeout:g} s. "
                    f"If that process is gone, delete {self.path}"
                )
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            wait = min(wait * 2, self.settings.max_poll)

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:
            return False
        if holder and holder_gone(holder):
            return True
        try:
            age = time.time() - (float(holder["epoch"]) if holder.get("epoch") else self.path.stat().st_mtime)
        except (OSError, TypeError, ValueError):
            return False
        # an empty file is a holder between create and write: stale only when it stays empty for long
        return age > (self.settings.stale_after if holder else min(self.settings.stale_after, 30.0))

    def _break_if_stale(self) -> bool:
        """Remove the lock file when its holder is gone; breakers take turns through ``<lock>.break``."""
        holder = self.read_holder()
        if not self._stale(holder):
            return False
        breaker = FileLock(self.path.with_name(self.path.name + ".break"), LockSettings(timeout=0.0, stale_after=30.0), self.what)
        try:
            fd = os.open(breaker.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            breaker._break_if_stale_breaker()
            return False
        try:
            os.write(fd, json.dumps(owner_info("breaking a stale lock")).encode())
            os.close(fd)
            again = self.read_holder()
            if again == holder or (not holder and not again):  # still the lock judged stale
                _unlink(self.path)
                return True
            return False
        finally:
            _unlink(breaker.path)

    def _break_if_stale_breaker(self) -> None:
        """A breaker that died while breaking leaves ``<lock>.break``; it is held for microseconds, so remove it."""
        holder = self.read_holder()
        if holder is not None and self._stale(holder):
            _unlink(self.path)

    def __repr__(self) -> str:
        return f"<FileLock {self.path} {'held' if self.held else 'free'}>"


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` may write less than asked (a file size limit reached midway); a short lock file is unreadable."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if not written:
            raise OSError(errno.EIO, "nothing written")
        view = view[written:]


def _touch(path: Path) -> None:
    """Create ``path`` if missing (the waiters' sign); a failure only costs fairness."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
    except OSError:
        pass


def _unlink(path: Path, tries: int = 50) -> None:
    """Remove a file; on Windows a reader that has it open makes the removal fail for a moment, so try again."""
    for attempt in range(tries):
        try:
            path.unlink(missing_ok=True)
            return
        except PermissionError:
            if sys.platform != "win32" or attempt == tries - 1:
                raise
            time.sleep(0.01)


class _Held:
    """The context manager of :meth:`FileLock.hold`."""

    def __init__(self, lock: FileLock, purpose: str, timeout: float | None):
        self.lock, self.purpose, self.timeout = lock, purpose, timeout

    def __enter__(self) -> FileLock:
        self.lock.acquire(self.purpose, self.timeout)
        return self.lock

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.lock.release()
