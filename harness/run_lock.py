"""One process per run (`RunLock`, an flock on a file in the run's folder) and clean stops
(`StopSignal`: Ctrl-C, SIGTERM, SIGHUP or a time limit end a run after the step in flight)."""
import fcntl
import os
import signal
import threading
from pathlib import Path

from harness.cli import notice


class RunLock:
    """`{out_dir}/.{name}.lock` (`.{name}_{kind}.lock` for a kind other than ANML), holding the pid of
    the one process that writes the run's files there. The lock is an flock, so the kernel frees it
    when that process dies however it dies; a lock file left by a dead process is taken over with a
    notice. Re-entrant within a process (a script takes it before loading the data, the loop again)."""

    held = {}  # lock path -> [file descriptor, depth], for this process

    def __init__(self, out_dir, name, kind="ANML"):
        self.out_dir, self.name = Path(out_dir), name
        self.stale_pid = None  # the pid of a process that died holding the lock, once taken over
        self.path = self.out_dir / (f".{name}.lock" if kind == "ANML" else f".{name}_{kind}.lock")

    def __enter__(self):
        key = str(self.path.absolute())
        if key in RunLock.held:
            RunLock.held[key][1] += 1
        else:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            RunLock.held[key] = [self._acquire(), 1]
        return self

    def __exit__(self, *exc):
        key = str(self.path.absolute())
        RunLock.held[key][1] -= 1
        if RunLock.held[key][1] == 0:
            fd, _ = RunLock.held.pop(key)
            self.path.unlink(missing_ok=True)  # before the unlock: a waiting process then retries
            os.close(fd)

    def _acquire(self):
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._pid_in(fd)
                os.close(fd)
                raise ValueError(f"{self.out_dir} is in use by another run of {self.name} (pid {holder}, lock "
                                 f"{self.path}): wait for it to end, stop it, or use another --out-dir") from None
            if self._still_linked(fd):
                self._take_over(fd)
                return fd
            os.close(fd)  # the holder removed the file as we opened it: retry on the new one
        raise ValueError(f"could not lock {self.path}")

    def _still_linked(self, fd):
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _take_over(self, fd):
        stale = self._pid_in(fd)
        if stale is not None and stale != os.getpid():
            notice(f"taking over the lock {self.path} of pid {stale}, which no longer holds it (it ended "
                   f"without removing it)")
            self.stale_pid = stale
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    @staticmethod
    def _pid_in(fd):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None


class StopSignal:
    """Turns SIGINT, SIGTERM, SIGHUP (a closed terminal) and a time limit into a request to stop
    after the current step; a second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, time_limit, clock):
        self.time_limit, self.clock, self.reason, self.old = time_limit, clock, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def requested(self):
        if self.reason is None and self.time_limit is not None and self.clock() >= self.time_limit:
            self.reason = f"time limit of {self.time_limit:g}s"
        return self.reason is not None

