"""Atomic file writes: every file the project writes (checkpoints, logs, JSON, downloads, caches)
is written beside its target under a temporary name, then renamed into place."""
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file could not be written (full disk, or any failure of its writer: torch.save raises
    RuntimeError); the target, if it existed, is untouched."""


def temporary_path(path, pid=None):
    """`.{name}.{pid}.tmp` beside `path`: hidden, and naming the process that writes it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}{TMP_SUFFIX}")


def write_atomic(path, write):
    """Call write(temporary path) beside `path`, then rename it into place: a crash never
    leaves a truncated file, and a failed write leaves the old file (if any) as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def one_line(error):
    """The first line of an exception's message, with its type when the message says little."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if not isinstance(error, OSError) or not text else text


def pid_alive(pid):
    """Whether a process with this pid exists (a pid of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_pid(tmp):
    """The pid in a `.{name}.{pid}.tmp` file name, or None when the name has none."""
    stem = tmp.name.removesuffix(TMP_SUFFIX)
    pid = stem.rsplit(".", 1)[-1]
    return int(pid) if tmp.name.startswith(".") and tmp.name.endswith(TMP_SUFFIX) and pid.isdigit() else None


def remove_stale_temporaries(folder):
    """Delete the `.*.tmp` files in `folder` left by processes that no longer run (a kill
    during a save); returns their paths. Files of live processes are left alone."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        pid = writer_pid(tmp)
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def probe_writable(folder):
    """Create `folder` if needed and write (then remove) a temporary file in it: raises OSError
    now, before any work, where a later write would fail (read-only, /proc, not a folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(folder / ".write-test")
    try:
        tmp.write_bytes(b"")
    finally:
        tmp.unlink(missing_ok=True)
